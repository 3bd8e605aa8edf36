"""The Grain input pipeline: corpus files to packed batches of token ids.

  files of a split -> this process's shard -> (train) shuffle, new order each
  epoch -> read + tokenize ([bos] + ids + [eos]) in threads -> concat-then-split
  packing into rows of seq_len, as `data.streams` such streams over disjoint
  files whose rows are interleaved -> batch -> prefetch in a thread

Each row of a batch holds whole documents and pieces of documents back to
back. `segment_ids` number them 1, 2, ... within the row (0 marks padding,
which only the end of a non-repeating dataset has) and `positions` restart at
0 in every segment, so attention and RoPE never cross a document boundary.
The iterator checkpoints with Grain's get_state()/set_state().
"""

import functools
import pathlib

import grain
import ml_collections
import numpy as np

from clm_jax import tokenizer as tokenizer_lib
from clm_jax.data import sources

SPLITS = ('train', 'heldout')

# Documents read and tokenized ahead of packing, by this many threads. Whole
# files are a few thousand tokens each, so 64 cover several batches of 2048.
_READ_THREADS = 1
_READ_BUFFER = 8
# Batches packed ahead of the training step, so packing overlaps compute.
_BATCH_BUFFER = 2


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
    tokenizer: Encodes documents; its bos/eos wrap each one and its pad id
      fills padding.
    seq_len: Tokens per row (T).
    batch_size: Rows per batch on this process.
    split: 'train' (shuffled with `seed`, reshuffled every epoch) or 'heldout'
      (files in fixed order).
    seed: Seeds the train shuffle; ignored for 'heldout'.
    shard_index: This process's shard, in [0, shard_count).
    shard_count: Processes sharing the split; each reads every
      shard_count-th file, so shards are disjoint.
    repeat: Cycle through the files forever; else stop after one pass (the
      last, partial batch is dropped).

  Returns:
    An IterDataset of {'tokens', 'segment_ids', 'positions'}, each an int32
    array of shape [batch_size, seq_len].

  Raises:
    ValueError: Bad split, shard or sizes, or a shard with no files.
  """
  if split not in SPLITS:
    raise ValueError(f'split={split!r} must be one of {SPLITS}.')
  if not 0 <= shard_index < shard_count:
    raise ValueError(f'shard_index={shard_index} not in [0, {shard_count}).')
  if seq_len < 1 or batch_size < 1:
    raise ValueError(f'seq_len={seq_len} and batch_size={batch_size} must be >= 1.')
  split_list = files_for_split(c_data, split)
  files = split_list[shard_index::shard_count]
  if not files:
    raise ValueError(
      f'Shard {shard_index} of {shard_count} of the {split} split is empty: the '
      f'split has {len(split_list)} files (data.path={c_data.path!r}, '
      f'data.heldout_fraction={c_data.heldout_fraction}).'
    )

  # Rows of one packed stream follow each other through a file (a file is
  # thousands of tokens), so a batch drawn from one stream would hold one or
  # two files and a gradient as narrow. Packing `data.streams` disjoint file
  # streams and interleaving their rows gives each batch as many files,
  # and stays checkpointable (unlike a row shuffle buffer).
  num_streams = max(1, min(c_data.streams, len(files)))
  streams = [
    _packed_stream(
      files[i::num_streams],
      tokenizer,
      seq_len=seq_len,
      shuffle_seed=seed + i if split == 'train' else None,
      repeat=repeat,
    )
    for i in range(num_streams)
  ]
  ds = grain.experimental.InterleaveIterDataset(streams, cycle_length=num_streams)
  ds = ds.batch(batch_size, drop_remainder=True)
  return grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=_BATCH_BUFFER)


def _packed_stream(files, tokenizer, *, seq_len, shuffle_seed, repeat) -> grain.IterDataset:
  """One stream of files -> documents -> rows of seq_len, in file order."""
  ds = grain.MapDataset.source([str(path) for path in files])
  if shuffle_seed is not None:
    # Repeating a shuffled MapDataset reseeds each epoch: a new order per epoch.
    ds = ds.shuffle(shuffle_seed)
  if repeat:
    ds = ds.repeat()
  ds = ds.map(functools.partial(_document, tokenizer=tokenizer))
  ds = ds.to_iter_dataset(
    grain.ReadOptions(num_threads=_READ_THREADS, prefetch_buffer_size=_READ_BUFFER)
  )
  ds = grain.experimental.ConcatThenSplitIterDataset(ds, length_struct={'tokens': seq_len})
  return ds.map(functools.partial(_rename, pad_id=tokenizer.pad_id))


def files_for_split(c_data: ml_collections.ConfigDict, split: str) -> list[pathlib.Path]:
  """Returns the files of one split of the corpus, in sorted order."""
  files = sources.list_files(c_data)
  root = sources.corpus_root(c_data)
  train, heldout = sources.split_files(files, root, c_data.heldout_fraction)
  return train if split == 'train' else heldout


def _document(path: str, *, tokenizer: tokenizer_lib.Tokenizer) -> dict:
  ids = tokenizer.encode(sources.read_text(path))
  return {'tokens': np.array([tokenizer.bos_id, *ids, tokenizer.eos_id], np.int32)}


def _rename(packed: dict, *, pad_id: int) -> dict:
  segment_ids = packed['tokens_segment_ids']
  # Grain pads with zeros, which is <unk>; the tokenizer's pad id says what it is.
  tokens = np.where(segment_ids > 0, packed['tokens'], np.int32(pad_id))
  return {
    'tokens': tokens.astype(np.int32, copy=False),
    'segment_ids': segment_ids.astype(np.int32, copy=False),
    'positions': packed['tokens_positions'].astype(np.int32, copy=False),
  }
