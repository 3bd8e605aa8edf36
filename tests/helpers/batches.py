"""Packed batches for the tests: two documents per row, then padding, as packing makes them."""

import numpy as np


def packed_batch(c, seed: int = 0) -> dict:
  """A [B, T] batch of config `c`: random tokens, rows cut at varied offsets."""
  rng = np.random.default_rng(seed)
  B, T = c.train.global_batch_size, c.train.seq_len
  cut = rng.integers(4, T - 4, B)
  idx = np.arange(T)[None]
  segments = np.where(idx < cut[:, None], 1, 2).astype(np.int32)
  segments[:, -3:] = 0
  positions = np.where(idx < cut[:, None], idx, idx - cut[:, None]) * (segments > 0)
  tokens = rng.integers(0, c.model.vocab_size, (B, T))
  return {
    'tokens': tokens.astype(np.int32),
    'segment_ids': segments,
    'positions': positions.astype(np.int32),
  }
