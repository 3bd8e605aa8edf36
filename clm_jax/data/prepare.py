"""`data prepare`: raw sources to deduplicated, tokenized ArrayRecord shards.

  inputs -> units (a batch of files, a JSONL file, a Parquet row group)
  -> in worker processes, per unit: read, skip bad inputs, quality filters,
     tokenize, content hash + MinHash signature -> work/unit-N.{array_record,npz,json}
  -> in this process, in unit order: exact + near dedup, held-out split by content hash
  -> train/ and heldout/ shards per language, manifest.json, tokenizer.model

A unit's .json is written last, so it marks the unit done: an interrupted
preparation re-run with the same arguments skips finished units and redoes
only the rest. Dedup runs in one process over all units in a fixed order, so
which copy of a duplicate is kept never depends on worker timing.
"""

import dataclasses
import datetime
import json
import multiprocessing
import os
import pathlib
import shutil
import sys
import time
from collections.abc import Sequence

import numpy as np
import tqdm

from clm_jax.data import dedup
from clm_jax.data import filters
from clm_jax.data import records
from clm_jax.data import sources
from clm_jax.data import tokenizer as tokenizer_lib

WORK = 'work'


@dataclasses.dataclass(frozen=True)
class PrepareOptions:
  """Everything besides the inputs that decides what a preparation writes."""

  read: sources.ReadOptions = sources.ReadOptions()
  quality: filters.FilterOptions = filters.FilterOptions()
  languages: tuple[str, ...] = ()  # Keep only these languages; () keeps all.
  near_dup_threshold: float = 0.85  # MinHash Jaccard at which a document is a copy; 0 = off.
  num_perm: int = 128  # MinHash permutations: more is a finer Jaccard estimate, slower.
  heldout_fraction: float = 0.005  # Documents held out for evaluation, by content hash.
  shard_mb: float = 256  # Target size of an output shard.
  files_per_unit: int = 256  # Files of a directory per unit of work.

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def prepare(
  inputs: Sequence[str],
  output: str | os.PathLike,
  tokenizer_path: str | os.PathLike,
  options: PrepareOptions = PrepareOptions(),
  *,
  workers: int = 0,
  keep_work: bool = False,
  progress: bool = True,
) -> dict:
  """Prepares `inputs` into `output` and returns the manifest.

  Args:
    inputs: Directories, JSONL(.gz) files, Parquet files or source files.
    output: The prepared directory (see clm_jax.data.records).
    tokenizer_path: The sentencepiece model to tokenize with; copied to output.
    options: Filters, dedup and sharding.
    workers: Tokenizing processes; 0 = one per CPU. 1 runs in this process.
    keep_work: Keep the per-unit intermediate files under output/work.
    progress: Show progress bars on stderr.

  Raises:
    records.DataError: `output` holds an unfinished preparation of other
      inputs or options, or the inputs hold no usable document.
    FileNotFoundError: An input or the tokenizer does not exist.
  """
  output = pathlib.Path(output).expanduser()
  if (output / records.MANIFEST).is_file():
    print(f'{output} is already prepared; delete it to prepare again.', flush=True)
    return json.loads((output / records.MANIFEST).read_text())
  tok = tokenizer_lib.load(tokenizer_path)
  unknown = set(options.languages) - set(sources.LANGUAGES) - {'unknown'}
  if unknown:
    raise ValueError(f'--languages: {sorted(unknown)} not among {sources.LANGUAGES}.')
  units = sources.list_units(inputs, files_per_unit=options.files_per_unit)
  work = output / WORK
  created = not output.exists()
  _claim(work, inputs, units, tok, options)

  start = time.perf_counter()
  stats = _process_units(units, work, tok.path, options, workers or os.cpu_count() or 1, progress)
  if not sum(unit['kept'] for unit in stats):
    _refuse_empty(inputs, stats, output, created, keep_work)
  keep, heldout, dropped = _deduplicate(units, work, options, progress)
  shards = _write_shards(units, work, keep, heldout, output, tok, options, progress)
  manifest = _manifest(inputs, tok, options, stats, dropped, shards)
  manifest['seconds'] = round(time.perf_counter() - start, 2)
  shutil.copyfile(tok.path, output / tokenizer_lib.TOKENIZER_FILE)
  _write_json(output / records.MANIFEST, manifest)
  if not keep_work:
    shutil.rmtree(work)
  _summary(output, manifest)
  return json.loads((output / records.MANIFEST).read_text())  # As a reader will see it.


def _refuse_empty(inputs, stats, output, created, keep_work) -> None:
  """Raises instead of writing a dataset with no document; cleans up unless asked not to."""
  dropped = {}
  for unit in stats:
    for reason, count in unit['dropped'].items():
      dropped[reason] = dropped.get(reason, 0) + count
  read = sum(unit['documents'] for unit in stats)
  print(
    f'warning: {read} inputs read, none usable: {dict(sorted(dropped.items()))}', file=sys.stderr
  )
  if not keep_work:
    shutil.rmtree(output / WORK)
    if created and not any(output.iterdir()):
      output.rmdir()  # Else a rerun with fixed inputs would meet "another preparation".
  raise records.DataError(
    f'--input={",".join(map(str, inputs))}: no usable document ({read} inputs read, dropped: '
    f'{dict(sorted(dropped.items()))}); nothing written to {output}.'
  )


def _claim(work, inputs, units, tok, options) -> None:
  """Records what this output is for, or checks that a resumed run is the same."""
  plan = {
    'inputs': [str(pathlib.Path(p).expanduser().resolve()) for p in inputs],
    'units': [unit.name for unit in units],
    'tokenizer_sha256': records.file_sha256(tok.path),
    'options': options.to_json(),
  }
  path = work / 'plan.json'
  if path.is_file():
    if json.loads(path.read_text()) != json.loads(json.dumps(plan)):
      raise records.DataError(
        f'{work.parent} holds an unfinished preparation of other inputs, tokenizer or '
        'options; delete it or choose another --output.'
      )
    return
  work.mkdir(parents=True, exist_ok=True)
  _write_json(path, plan)


def _unit_path(work: pathlib.Path, index: int, suffix: str) -> pathlib.Path:
  return work / f'unit-{index:06d}{suffix}'


def _process_units(units, work, tokenizer_path, options, workers, progress) -> list[dict]:
  done = {i for i in range(len(units)) if _unit_path(work, i, '.json').is_file()}
  pending = [(i, unit) for i, unit in enumerate(units) if i not in done]
  if done:
    print(f'Resuming: {len(done)} of {len(units)} units already done.', flush=True)
  args = [(i, unit, str(work), tokenizer_path, options) for i, unit in pending]
  bar = tqdm.tqdm(total=len(units), initial=len(done), unit='unit', disable=not progress)
  read_mb = 0.0
  with bar:
    if workers == 1 or len(pending) <= 1:
      results = map(_process_unit_star, args)
      pool = None
    else:
      # spawn, not fork: the parent may hold JAX's or sentencepiece's threads.
      pool = multiprocessing.get_context('spawn').Pool(min(workers, len(pending)))
      results = pool.imap_unordered(_process_unit_star, args)
    try:
      for result in results:
        read_mb += result['bytes_read'] / 2**20
        bar.set_postfix_str(f'{read_mb:.1f} MB read')
        bar.update()
    finally:
      if pool is not None:
        pool.terminate()
  return [json.loads(_unit_path(work, i, '.json').read_text()) for i in range(len(units))]


def _process_unit_star(args):
  return _process_unit(*args)


_TOKENIZERS = {}


def _process_unit(index, unit, work, tokenizer_path, options) -> dict:
  """Reads, filters, tokenizes and fingerprints one unit into work/unit-N.*."""
  work = pathlib.Path(work)
  tok = _TOKENIZERS.get(tokenizer_path) or _TOKENIZERS.setdefault(
    tokenizer_path, tokenizer_lib.load(tokenizer_path)
  )
  dtype = records.token_dtype(tok.vocab_size)
  dropped, damaged, documents, bytes_read = {}, [], 0, 0
  digests, signatures, tokens, sizes, languages = [], [], [], [], []
  with records.ShardWriter(_unit_path(work, index, '.array_record')) as writer:
    for item in sources.read_unit(unit, options.read):
      documents += 1
      if isinstance(item, sources.Skipped):
        dropped[item.reason] = dropped.get(item.reason, 0) + 1
        if item.damaged:
          damaged.append({'source': item.source, 'reason': item.reason})
        continue
      size = len(item.text.encode())
      bytes_read += size
      reason = None
      if options.languages and item.language not in options.languages:
        reason = 'language'
      else:
        path = item.source if unit.kind == 'files' else ''
        reason = filters.drop_reason(
          item.text, path=path, language=item.language, options=options.quality
        )
      if reason:
        dropped[reason] = dropped.get(reason, 0) + 1
        continue
      ids = np.asarray(tok.encode(item.text), np.int32)
      writer.write(records.encode(ids, dtype, language=item.language, source=item.source))
      digests.append(np.frombuffer(dedup.content_hash(item.text), np.uint8))
      signatures.append(dedup.signature(item.text, num_perm=options.num_perm))
      tokens.append(ids.size)
      sizes.append(size)
      languages.append(item.language)
  kept = len(tokens)
  arrays = dict(
    digests=np.stack(digests) if kept else np.zeros((0, 32), np.uint8),
    signatures=np.stack(signatures) if kept else np.zeros((0, options.num_perm), np.uint64),
    tokens=np.asarray(tokens, np.int64),
    bytes=np.asarray(sizes, np.int64),
    languages=np.asarray(languages, dtype='U16'),
  )
  tmp = _unit_path(work, index, '.tmp.npz')
  np.savez(tmp, **arrays)
  os.replace(tmp, _unit_path(work, index, '.npz'))
  stats = {
    'unit': unit.name,
    'documents': documents,
    'kept': kept,
    'dropped': dropped,
    'damaged': damaged,
    'bytes_read': bytes_read,
  }
  _write_json(_unit_path(work, index, '.json'), stats)
  return stats


def _load_arrays(work, index) -> dict:
  with np.load(_unit_path(work, index, '.npz'), allow_pickle=False) as f:
    return {key: f[key] for key in f.files}


def _deduplicate(units, work, options, progress):
  """Keep masks and held-out masks per unit, and the duplicates dropped."""
  index = None
  if options.near_dup_threshold > 0:
    index = dedup.Deduplicator(threshold=options.near_dup_threshold, num_perm=options.num_perm)
  seen, keep, heldout = set(), [], []
  dropped = {'exact_duplicate': 0, 'near_duplicate': 0}
  for i in tqdm.trange(len(units), desc='dedup', unit='unit', disable=not progress):
    arrays = _load_arrays(work, i)
    mask = np.ones(len(arrays['tokens']), bool)
    held = np.zeros_like(mask)
    for j, (digest, signature) in enumerate(
      zip(arrays['digests'], arrays['signatures'], strict=True)
    ):
      digest = digest.tobytes()
      if index is not None:
        reason = index.check(f'{i}:{j}', digest, signature)
      else:
        reason = 'exact_duplicate' if digest in seen else None
        seen.add(digest)
      if reason:
        mask[j] = False
        dropped[reason] += 1
      else:
        held[j] = sources.unit_hash(digest, 'heldout') < options.heldout_fraction
    keep.append(mask)
    heldout.append(held)
  return keep, heldout, dropped


def _write_shards(units, work, keep, heldout, output, tok, options, progress) -> dict:
  """Copies the kept records into train/ and heldout/ shards per language."""
  for split in records.SPLITS:
    shutil.rmtree(output / split, ignore_errors=True)
  shard_bytes = int(options.shard_mb * 2**20)
  open_shards, shards = {}, {split: [] for split in records.SPLITS}

  def close(key):
    writer, info = open_shards.pop(key)
    writer.close()
    info['bytes'] = writer.path.stat().st_size
    info['records'] = writer.records
    shards[key[0]].append(info)

  for i in tqdm.trange(len(units), desc='write', unit='unit', disable=not progress):
    if not keep[i].any():
      continue
    arrays = _load_arrays(work, i)
    unit_records = records.read_shard(_unit_path(work, i, '.array_record'))
    for j in np.flatnonzero(keep[i]):
      split = 'heldout' if heldout[i][j] else 'train'
      language = str(arrays['languages'][j])
      key = (split, language)
      if key not in open_shards:
        number = sum(s['language'] == language for s in shards[split])
        name = f'{split}/{language}-{number:05d}.array_record'
        open_shards[key] = (
          records.ShardWriter(_inside(output, name)),
          {'file': name, 'language': language, 'tokens': 0, 'documents_bytes': 0},
        )
      writer, info = open_shards[key]
      writer.write(unit_records[j])
      info['tokens'] += int(arrays['tokens'][j])
      info['documents_bytes'] += int(arrays['bytes'][j])
      if info['tokens'] * np.dtype(records.token_dtype(tok.vocab_size)).itemsize >= shard_bytes:
        close(key)
  for key in sorted(open_shards):
    close(key)
  for split in records.SPLITS:
    shards[split].sort(key=lambda s: s['file'])
  return shards


def _inside(output: pathlib.Path, name: str) -> pathlib.Path:
  """output / name, which must stay inside output (names hold languages from the data)."""
  if not records.is_relative_name(name):
    raise records.DataError(f'{output / name} is outside --output={output}: refused.')
  return output / name


def _manifest(inputs, tok, options, stats, dropped, shards) -> dict:
  for unit in stats:
    for reason, count in unit['dropped'].items():
      dropped[reason] = dropped.get(reason, 0) + count
  languages = {}
  for split in records.SPLITS:
    for shard in shards[split]:
      entry = languages.setdefault(shard['language'], {'documents': 0, 'tokens': 0, 'bytes': 0})
      entry['documents'] += shard['records']
      entry['tokens'] += shard['tokens']
      entry['bytes'] += shard['documents_bytes']
  return {
    'format': records.FORMAT,
    'created': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'),
    'inputs': [str(p) for p in inputs],
    'tokenizer': {
      'file': tokenizer_lib.TOKENIZER_FILE,
      'sha256': records.file_sha256(tok.path),
      'vocab_size': tok.vocab_size,
    },
    'dtype': records.token_dtype(tok.vocab_size),
    'options': options.to_json(),
    'documents': {
      'read': sum(unit['documents'] for unit in stats),
      'kept': sum(entry['documents'] for entry in languages.values()),
      'dropped': dict(sorted((k, v) for k, v in dropped.items() if v)),
    },
    # Inputs cut short (a truncated gzip) or unreadable as a whole: what of
    # them was read is kept, the rest is lost.
    # (.get: units finished by an older version, resumed, have no such list.)
    'damaged_inputs': [entry for unit in stats for entry in unit.get('damaged', [])],
    'bytes_read': sum(unit['bytes_read'] for unit in stats),
    'languages': dict(sorted(languages.items())),
    'tokens_written': sum(entry['tokens'] for entry in languages.values()),
    'splits': shards,
  }


def _summary(output, manifest) -> None:
  docs = manifest['documents']
  print(
    f'Prepared {output}: {docs["kept"]:,} of {docs["read"]:,} documents kept, '
    f'{manifest["tokens_written"]:,} tokens, {manifest["bytes_read"] / 2**20:.1f} MB read '
    f'in {manifest["seconds"]:.1f}s.',
    flush=True,
  )
  for reason, count in docs['dropped'].items():
    print(f'  dropped {reason}: {count:,}', flush=True)
  for entry in manifest['damaged_inputs']:
    print(
      f'warning: {entry["source"]}: {entry["reason"]}; the rest of it is lost.', file=sys.stderr
    )


def _write_json(path: pathlib.Path, value) -> None:
  tmp = path.with_name(f'.{path.name}.tmp')
  tmp.write_text(json.dumps(value, indent=2) + '\n')
  os.replace(tmp, path)
