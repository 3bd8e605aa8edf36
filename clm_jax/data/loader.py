"""The Grain input pipeline: documents to packed batches of token ids.

Documents per language -> (train) shuffle, repeat, mix by `data.mixture` ->
[bos] ... [eos], and a FIM form with probability `data.fim_rate` ->
`data.streams` packed streams, each document in its FIM form only where that
lies within one row -> each global batch takes B/S rows of every stream.
Batches depend on the config alone, not on the process count, and everything
before packing is a MapDataset, so the iterator state is positions (and where
the next document starts in its row) and a resumed run sees exactly the
batches it would have. Long
documents continue in the next row; `segment_ids` (0 = padding) and `positions`
restart per document, so attention and RoPE never cross one.
"""

import functools
import pathlib

import grain
import ml_collections
import numpy as np
from absl import flags
from absl import logging

from clm_jax import config as config_lib
from clm_jax.data import chat
from clm_jax.data import fim
from clm_jax.data import records
from clm_jax.data import sources
from clm_jax.data import tokenizer as tokenizer_lib

SPLITS = records.SPLITS


def make_dataset(
  c_data: ml_collections.ConfigDict,
  tokenizer: tokenizer_lib.Tokenizer,
  *,
  seq_len: int,
  batch_size: int,
  split: str,
  seed: int,
  rows: tuple[int, int] | None = None,
  repeat: bool = True,
) -> grain.IterDataset:
  """Builds the packed, batched dataset of one split, or a process's rows of it.

  Args:
    batch_size: Rows per global batch (B), over all processes.
    split: 'train' (shuffled, reshuffled every epoch, mixed) or 'heldout'
      (fixed order, not mixed).
    rows: The rows [lo, hi) of every global batch to make (this process's
      share, `sharding.process_rows`); default all of them.
    repeat: Cycle forever; else one pass, dropping the last partial batch.

  Returns:
    An IterDataset of {'tokens', 'segment_ids', 'positions'} (plus 'loss_mask'
    for instructions), each int32 [hi - lo, seq_len].

  Raises:
    records.DataError: The data is missing, empty, corrupt, lacks a language
      the mixture names, or was made with another tokenizer.
  """
  if split not in SPLITS:
    raise ValueError(f'split={split!r} must be one of {SPLITS}.')
  if seq_len < 1 or batch_size < 1:
    raise ValueError(f'seq_len={seq_len} and batch_size={batch_size} must be >= 1.')
  lo, hi = rows or (0, batch_size)
  if not 0 <= lo < hi <= batch_size:
    raise ValueError(f'rows=[{lo}, {hi}) is not a part of a batch of {batch_size}.')
  num_streams = config_lib.stream_count(c_data, batch_size)
  if batch_size % num_streams:
    raise ValueError(f'data.streams={c_data.streams} must divide the batch size {batch_size}.')
  if c_data.fim_rate > 0:
    try:
      fim.check_tokenizer(tokenizer)
    except ValueError as e:
      raise records.DataError(str(e)) from e

  groups = document_groups(c_data, tokenizer, split)
  weights = config_lib.parse_mixture(c_data.mixture) if split == 'train' else {}
  if weights:
    missing = set(weights) - set(groups)
    if missing:
      raise records.DataError(
        f'data.mixture names {sorted(missing)}, but the {split} split has only '
        f'{sorted(groups)} (data.source={c_data.source!r}, data.path={c_data.path!r}).'
      )
    groups = {language: groups[language] for language in weights}
  else:
    # No mixture: every language in its natural proportion, as one sequence.
    groups = {'all': grain.MapDataset.concatenate([groups[k] for k in sorted(groups)])}

  shards = []
  for language, ds in groups.items():
    if not len(ds):
      raise records.DataError(
        f'The {split} split has no {language} documents '
        f'(data.source={c_data.source!r}, data.path={c_data.path!r}).'
      )
    if split == 'train':
      # Repeating a shuffled MapDataset reseeds each epoch: a new order per epoch.
      ds = ds.shuffle(seed + sources.stable_int(language))
    shards.append(ds.repeat() if repeat else ds)
  if weights:
    ds = grain.MapDataset.mix(shards, [weights[language] for language in groups])
  else:
    (ds,) = shards
  # Dialogs come rendered, BOS / EOS per turn, and never FIM (config checks).
  with_fim = c_data.fim_rate > 0 and c_data.source != 'instruct'
  if c_data.source != 'instruct':
    ds = ds.random_map(
      functools.partial(
        _wrap,
        tokenizer=tokenizer,
        fim_rate=c_data.fim_rate,
        spm_rate=c_data.fim_spm_rate,
      ),
      seed=seed,
    )

  # Rows of one packed stream follow each other through a document, so a batch
  # drawn from one stream would hold a long document's rows and a gradient as
  # narrow. Packing S streams of different documents and taking B/S rows of
  # each gives every batch as many documents, and stays checkpointable (unlike
  # a row shuffle buffer). A process builds only the streams behind its rows.
  per_stream = batch_size // num_streams
  first, last = lo // per_stream, -(-hi // per_stream)
  streams = [
    _packed_stream(ds[i::num_streams], seq_len, c_data, with_fim).batch(
      per_stream, drop_remainder=True
    )
    for i in range(first, last)
  ]
  ds = ConcatIterDataset(streams)
  if (lo, hi) != (first * per_stream, last * per_stream):
    # Rows that share a stream with another process's rows: read and dropped.
    ds = ds.map(
      functools.partial(_rows, start=lo - first * per_stream, stop=hi - first * per_stream)
    )
  ds = ds.map(functools.partial(_rename, pad_id=tokenizer.pad_id))
  if c_data.workers:
    # Grain's worker start-up reads its absl flags; outside an absl app (a
    # notebook, pytest) nothing parsed them, and their defaults are right.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=c_data.workers))
  if c_data.prefetch:
    # Batches packed ahead in a thread, so packing overlaps the train step.
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=c_data.prefetch)
  return ds


class ConcatIterDataset(grain.IterDataset):
  """Batches of several datasets concatenated along the rows; ends with the first to end.

  Not Grain's InterleaveIterDataset: that alternates elements, and under
  mp_prefetch hands whole parents to workers (a worker with none fails).
  """

  def __init__(self, parents: list[grain.IterDataset]):
    super().__init__(parents)

  def __iter__(self):
    return _ConcatIterator([iter(parent) for parent in self._parents])


class _ConcatIterator(grain.DatasetIterator):
  def __next__(self):
    parts = [next(parent) for parent in self._parents]
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}

  def get_state(self) -> dict:
    return {'parents': [parent.get_state() for parent in self._parents]}

  def set_state(self, state: dict) -> None:
    for parent, parent_state in zip(self._parents, state['parents'], strict=True):
      parent.set_state(_untangle_json(parent_state))


class FimIfUncutIterDataset(grain.IterDataset):
  """Each document in its FIM form where that form would lie within one packed row.

  CodeLlama applies FIM "to documents that are not cut across multiple model
  contexts only" (paper, section 2.3): a FIM example missing its start or end
  teaches infilling without the context it is about. Whether a document is cut
  depends on where packing puts it, hence an iterator just before the packer.
  Parent elements are {'tokens', 'fim'}, 'fim' the FIM form or None.
  """

  def __init__(self, parent: grain.IterDataset, seq_len: int):
    super().__init__(parent)
    self._seq_len = seq_len

  def __iter__(self):
    return _FimIfUncutIterator(iter(self._parent), self._seq_len)


class _FimIfUncutIterator(grain.DatasetIterator):
  def __init__(self, parent: grain.DatasetIterator, seq_len: int):
    super().__init__(parent)
    self._seq_len = seq_len
    # Where the next document starts in its row. ConcatThenSplit with one
    # feature (split_full_length_features left True) concatenates without
    # padding and cuts every seq_len tokens, so this is the running length
    # modulo seq_len; Grain exposes no such position to ask it for.
    self._offset = 0

  def __next__(self):
    doc = next(self._parent)
    tokens = doc['tokens']
    if doc['fim'] is not None and self._offset + doc['fim'].size <= self._seq_len:
      tokens = doc['fim']
    self._offset = (self._offset + tokens.size) % self._seq_len
    return {'tokens': tokens}

  def get_state(self) -> dict:
    return {'parent': self._parent.get_state(), 'offset': self._offset}

  def set_state(self, state: dict) -> None:
    if set(state) != {'parent', 'offset'}:
      raise ValueError(
        'The data iterator state holds no row offset for data.fim_rate > 0: it was '
        'saved by a version that applied FIM before packing, or with data.fim_rate=0. '
        f'Keys found: {sorted(state)}.'
      )
    self._parent.set_state(state['parent'])
    self._offset = state['offset']


def _rows(batch: dict, *, start: int, stop: int) -> dict:
  return {key: value[start:stop] for key, value in batch.items()}


def _untangle_json(state):
  """Undoes what a JSON round trip does to ConcatThenSplit's state.

  JSON turns 'remainder_slices' tuples into lists, which Grain 0.2.18 never
  equates with its (-1, -1) "no remainder", so it resumes at the wrong row.
  """
  if isinstance(state, dict):
    return {
      key: (
        {k: tuple(v) for k, v in value.items()}
        if key == 'remainder_slices'
        else _untangle_json(value)
      )
      for key, value in state.items()
    }
  if isinstance(state, list):
    return [_untangle_json(value) for value in state]
  return state


def _packed_stream(ds: grain.MapDataset, seq_len: int, c_data, with_fim: bool) -> grain.IterDataset:
  # Grain's own packer: documents concatenated and cut into rows of exactly
  # seq_len; the part of a document that does not fit opens the next row. An
  # instruction's loss mask is packed alongside its tokens, so it stays aligned.
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=c_data.read_threads))
  if with_fim:
    ds = FimIfUncutIterDataset(ds, seq_len)
  features = ('tokens', 'loss_mask') if c_data.source == 'instruct' else ('tokens',)
  return grain.experimental.ConcatThenSplitIterDataset(
    ds, length_struct={feature: seq_len for feature in features}
  )


def document_groups(
  c_data: ml_collections.ConfigDict, tokenizer: tokenizer_lib.Tokenizer, split: str
) -> dict[str, grain.MapDataset]:
  """The documents of a split by language, each a lazy MapDataset of int32 ids (no BOS/EOS)."""
  if c_data.source == 'instruct':
    examples, skipped = chat.records_to_examples(instruct_files(c_data, split), tokenizer)
    if skipped:
      logging.warning('%s split of %s: skipped records %s', split, c_data.path, dict(skipped))
    rows = [{'tokens': e.tokens, 'loss_mask': e.loss_mask} for e in examples]
    return {'all': grain.MapDataset.source(rows)}
  if c_data.source == 'prepared':
    directory = pathlib.Path(c_data.path).expanduser()
    manifest = records.read_manifest(directory)
    check_tokenizer(manifest, directory, tokenizer)
    by_language = {}
    for shard in manifest['splits'][split]:
      by_language.setdefault(shard['language'], []).append(shard)
    return {
      language: grain.MapDataset.source(
        records.ShardedRecords(
          [directory / s['file'] for s in shards],
          [s['records'] for s in shards],
          manifest['dtype'],
        )
      )
      for language, shards in sorted(by_language.items())
    }
  by_language = {}
  for path in files_for_split(c_data, split):
    by_language.setdefault(sources.language_of(path), []).append(str(path))
  encode = functools.partial(_encode_file, tokenizer=tokenizer)
  return {
    language: grain.MapDataset.source(paths).map(encode)
    for language, paths in sorted(by_language.items())
  }


def instruct_files(c_data: ml_collections.ConfigDict, split: str) -> list[pathlib.Path]:
  """JSONL files of an instruction set: `data.path` is a file (train only) or a directory
  whose heldout*.jsonl[.gz] files are the held-out split and the other *.jsonl[.gz] train."""
  path = pathlib.Path(c_data.path).expanduser()
  if path.is_file():
    return [path] if split == 'train' else []
  if not path.is_dir():
    raise FileNotFoundError(f'data.path={c_data.path!r}: no such instruction file or directory.')
  files = sorted(p for p in path.iterdir() if p.name.endswith(('.jsonl', '.jsonl.gz')))
  heldout = [p for p in files if p.name.startswith('heldout')]
  return heldout if split == 'heldout' else [p for p in files if p not in heldout]


def has_heldout(c_data: ml_collections.ConfigDict) -> bool:
  """Whether the data has a held-out split to evaluate on."""
  if c_data.source == 'instruct':
    return bool(instruct_files(c_data, 'heldout'))
  if c_data.source == 'prepared':
    manifest = records.read_manifest(c_data.path)
    return bool(manifest['splits']['heldout'])
  return c_data.heldout_fraction > 0


def check_tokenizer(manifest: dict, directory: pathlib.Path, tokenizer) -> None:
  """Prepared ids only mean something with the tokenizer that made them."""
  if records.file_sha256(tokenizer.path) != manifest['tokenizer']['sha256']:
    raise records.DataError(
      f'data.path={str(directory)!r} was prepared with its {tokenizer_lib.TOKENIZER_FILE} '
      f'(sha256 {manifest["tokenizer"]["sha256"][:12]}...), but the run uses '
      f'{tokenizer.path}; set data.tokenizer to {directory / tokenizer_lib.TOKENIZER_FILE} or to "".'
    )


def files_for_split(c_data: ml_collections.ConfigDict, split: str) -> list[pathlib.Path]:
  """Returns the files of one split of a raw-source corpus, in sorted order."""
  files = sources.list_files(c_data)
  root = sources.corpus_root(c_data)
  train, heldout = sources.split_files(files, root, c_data.heldout_fraction)
  return train if split == 'train' else heldout


def _encode_file(path: str, *, tokenizer: tokenizer_lib.Tokenizer) -> np.ndarray:
  return np.asarray(tokenizer.encode(sources.read_text(path)), np.int32)


def _wrap(ids, rng, *, tokenizer, fim_rate, spm_rate) -> dict:
  # The FIM form is made here, where Grain's read threads run it; whether the
  # document takes it is decided at packing (FimIfUncutIterDataset).
  permuted = fim.draw(ids, rng, tokenizer, fim_rate=fim_rate, spm_rate=spm_rate)
  doc = {'tokens': _bos_eos(ids, tokenizer)}
  if fim_rate > 0:
    doc['fim'] = None if permuted is None else _bos_eos(permuted, tokenizer)
  return doc


def _bos_eos(ids, tokenizer) -> np.ndarray:
  tokens = np.empty(len(ids) + 2, np.int32)
  tokens[0], tokens[1:-1], tokens[-1] = tokenizer.bos_id, ids, tokenizer.eos_id
  return tokens


def _rename(packed: dict, *, pad_id: int) -> dict:
  segment_ids = packed['tokens_segment_ids']
  # Grain pads with zeros, which is <unk>; the tokenizer's pad id says what it is.
  tokens = np.where(segment_ids > 0, packed['tokens'], np.int32(pad_id))
  out = {
    'tokens': tokens.astype(np.int32, copy=False),
    'segment_ids': segment_ids.astype(np.int32, copy=False),
    'positions': packed['tokens_positions'].astype(np.int32, copy=False),
  }
  if 'loss_mask' in packed:
    out['loss_mask'] = np.where(segment_ids > 0, packed['loss_mask'], 0).astype(np.int32)
  return out
