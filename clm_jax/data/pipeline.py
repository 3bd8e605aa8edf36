"""The Grain input pipeline: documents to packed batches of token ids.

  documents of a split, per language (ArrayRecord shards of `data prepare`,
  or source files tokenized on the fly)
  -> this process's share (process i of n takes every n-th document)
  -> (train) seeded shuffle, a new order every epoch, repeat
  -> weighted mixture over languages (`data.mixture`)
  -> fill-in-the-middle with probability `data.fim_rate`, then [bos] ... [eos]
  -> `data.streams` packed streams: concat-then-split into rows of seq_len
  -> rows of the streams interleaved -> batch -> `data.workers` processes -> prefetch

Every step before packing is a MapDataset, i.e. a pure function of the index,
so the only iterator state is positions; Grain's get_state()/set_state() save
and restore it and a resumed run sees exactly the batches it would have.

Each row holds whole documents and pieces of documents back to back; a long
document continues in the stream's next row, never truncated. `segment_ids`
number them 1, 2, ... within the row (0 marks padding, which only the end of
a non-repeating dataset has) and `positions` restart at 0 in every segment,
so attention and RoPE never cross a document boundary.
"""

import functools
import pathlib

import grain
import ml_collections
import numpy as np
from absl import flags

from clm_jax import tokenizer as tokenizer_lib
from clm_jax.data import fim
from clm_jax.data import records
from clm_jax.data import sources

SPLITS = records.SPLITS


def make_dataset(
  c_data: ml_collections.ConfigDict,
  tokenizer: tokenizer_lib.Tokenizer,
  *,
  seq_len: int,
  batch_size: int,
  split: str,
  seed: int,
  shard_index: int = 0,
  shard_count: int = 1,
  repeat: bool = True,
) -> grain.IterDataset:
  """Builds the packed, batched dataset of one split for one process.

  Args:
    c_data: The `data` config subtree.
    tokenizer: Encodes raw documents; its bos/eos wrap each document, its
      sentinels mark infilling, and its pad id fills padding.
    seq_len: Tokens per row (T).
    batch_size: Rows per batch on this process.
    split: 'train' (shuffled with `seed`, reshuffled every epoch, mixed by
      `data.mixture`) or 'heldout' (documents in fixed order, not mixed).
    seed: Seeds the shuffle and fill-in-the-middle.
    shard_index: This process's shard, in [0, shard_count).
    shard_count: Processes sharing the split; shards are disjoint.
    repeat: Cycle through the documents forever; else stop after one pass
      (the last, partial batch is dropped).

  Returns:
    An IterDataset of {'tokens', 'segment_ids', 'positions'}, each an int32
    array of shape [batch_size, seq_len].

  Raises:
    ValueError: Bad split, shard or sizes.
    records.DataError: The data lacks a language the mixture names, leaves a
      shard with no documents, or is missing, corrupt, or made with another
      tokenizer.
  """
  if split not in SPLITS:
    raise ValueError(f'split={split!r} must be one of {SPLITS}.')
  if not 0 <= shard_index < shard_count:
    raise ValueError(f'shard_index={shard_index} not in [0, {shard_count}).')
  if seq_len < 1 or batch_size < 1:
    raise ValueError(f'seq_len={seq_len} and batch_size={batch_size} must be >= 1.')
  if c_data.fim_rate > 0:
    try:
      fim.check_tokenizer(tokenizer)
    except ValueError as e:
      raise records.DataError(str(e)) from e

  groups = document_groups(c_data, tokenizer, split)
  weights = sources.parse_mixture(c_data.mixture) if split == 'train' else {}
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
    ds = ds[shard_index::shard_count]
    if not len(ds):
      raise records.DataError(
        f'Shard {shard_index} of {shard_count} of the {split} split has no {language} '
        f'documents (data.source={c_data.source!r}, data.path={c_data.path!r}).'
      )
    if split == 'train':
      # Repeating a shuffled MapDataset reseeds each epoch: a new order per epoch.
      ds = ds.shuffle(seed + sources.stable_int(language))
    shards.append(ds.repeat() if repeat else ds)
  if weights:
    ds = grain.MapDataset.mix(shards, [weights[language] for language in groups])
  else:
    (ds,) = shards
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
  # narrow. Packing `data.streams` streams of different documents and
  # interleaving their rows gives each batch as many documents, and stays
  # checkpointable (unlike a row shuffle buffer).
  num_streams = max(1, min(c_data.streams, len(ds)))
  streams = [_packed_stream(ds[i::num_streams], seq_len, c_data) for i in range(num_streams)]
  ds = RoundRobinIterDataset(streams)
  ds = ds.map(functools.partial(_rename, pad_id=tokenizer.pad_id))
  ds = ds.batch(batch_size, drop_remainder=True)
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


class RoundRobinIterDataset(grain.IterDataset):
  """The elements of several datasets in turn; an exhausted one drops out.

  Grain's InterleaveIterDataset would do, but it prefetches its parents in
  threads, and under mp_prefetch it hands whole parents to workers (a worker
  with none fails). A fixed turn keeps the state exact and simple: the next
  turn plus every parent's own state.
  """

  def __init__(self, parents: list[grain.IterDataset]):
    super().__init__(parents)

  def __iter__(self):
    return _RoundRobinIterator([iter(parent) for parent in self._parents])


class _RoundRobinIterator(grain.DatasetIterator):
  def __init__(self, parents):
    super().__init__(parents)
    self._turn = 0
    self._done = set()

  def __next__(self):
    for _ in range(len(self._parents)):
      turn = self._turn
      self._turn = (turn + 1) % len(self._parents)
      if turn not in self._done:
        try:
          return next(self._parents[turn])
        except StopIteration:
          self._done.add(turn)
    raise StopIteration

  def get_state(self) -> dict:
    return {
      'turn': self._turn,
      'done': sorted(self._done),
      'parents': [parent.get_state() for parent in self._parents],
    }

  def set_state(self, state: dict) -> None:
    self._turn, self._done = state['turn'], set(state['done'])
    for parent, parent_state in zip(self._parents, state['parents'], strict=True):
      parent.set_state(_untangle_json(parent_state))


def _untangle_json(state):
  """Undoes what a JSON round trip does to ConcatThenSplit's state.

  Checkpoints store iterator states as JSON, which turns the packer's
  'remainder_slices' tuples into lists; Grain 0.2.18 then compares them with
  its (-1, -1) "no remainder" tuple, takes every state for one with a
  remainder, and resumes at the wrong row.
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


def _packed_stream(ds: grain.MapDataset, seq_len: int, c_data) -> grain.IterDataset:
  # Grain's own packer: documents concatenated and cut into rows of exactly
  # seq_len; the part of a document that does not fit opens the next row.
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=c_data.read_threads))
  return grain.experimental.ConcatThenSplitIterDataset(ds, length_struct={'tokens': seq_len})


def document_groups(
  c_data: ml_collections.ConfigDict, tokenizer: tokenizer_lib.Tokenizer, split: str
) -> dict[str, grain.MapDataset]:
  """The documents of a split by language, each a MapDataset of int32 ids.

  Ids exclude BOS and EOS. Nothing is read until an element is asked for.
  """
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


def has_heldout(c_data: ml_collections.ConfigDict) -> bool:
  """Whether the data has a held-out split to evaluate on."""
  if c_data.source == 'prepared':
    manifest = records.read_manifest(c_data.path)
    return bool(manifest['splits']['heldout'])
  return c_data.heldout_fraction > 0


def check_tokenizer(manifest: dict, directory: pathlib.Path, tokenizer) -> None:
  """Prepared ids only mean something with the tokenizer that made them."""
  if records.file_sha256(tokenizer.path) != manifest['tokenizer']['sha256']:
    raise records.DataError(
      f'data.path={str(directory)!r} was prepared with its {records.TOKENIZER} '
      f'(sha256 {manifest["tokenizer"]["sha256"][:12]}...), but the run uses '
      f'{tokenizer.path}; set data.tokenizer to {directory / records.TOKENIZER} or to "".'
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
  ids = fim.maybe_permute(ids, rng, tokenizer, fim_rate=fim_rate, spm_rate=spm_rate)
  tokens = np.empty(ids.size + 2, np.int32)
  tokens[0], tokens[1:-1], tokens[-1] = tokenizer.bos_id, ids, tokenizer.eos_id
  return {'tokens': tokens}


def _rename(packed: dict, *, pad_id: int) -> dict:
  segment_ids = packed['tokens_segment_ids']
  # Grain pads with zeros, which is <unk>; the tokenizer's pad id says what it is.
  tokens = np.where(segment_ids > 0, packed['tokens'], np.int32(pad_id))
  return {
    'tokens': tokens.astype(np.int32, copy=False),
    'segment_ids': segment_ids.astype(np.int32, copy=False),
    'positions': packed['tokens_positions'].astype(np.int32, copy=False),
  }
