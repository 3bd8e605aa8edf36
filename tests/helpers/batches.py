"""Packed batches for the tests, and the loss they define computed the plain way.

Rows are ragged, as packing leaves them: one to three documents of random
lengths, then a padding tail of random length (some rows nearly all padding),
so rows and micro-batches hold different numbers of real targets. A wrong
weighting, such as the mean of per-micro-batch means, gives a different loss.
"""

import jax
import numpy as np
import optax

from clm_jax.model import decoder as model_lib


def packed_batch(c, seed: int = 0, loss_mask: bool = False) -> dict:
  """A [B, T] batch of config `c`: random tokens packed into ragged rows.

  With `loss_mask`, a 'loss_mask' as instruction data has it: each document
  starts with an unmarked prompt of random length, then its marked answer.
  """
  rng = np.random.default_rng(seed)
  B, T = c.train.global_batch_size, c.train.seq_len
  tokens = rng.integers(0, c.model.vocab_size, (B, T)).astype(np.int32)
  segments, positions, mask = (np.zeros((B, T), np.int32) for _ in range(3))
  for b in range(B):
    used = rng.integers(2, T + 1)
    docs = min(rng.integers(1, 4), used)
    cuts = np.sort(rng.choice(np.arange(1, used), docs - 1, replace=False))
    for doc, (start, end) in enumerate(zip([0, *cuts], [*cuts, used], strict=True)):
      segments[b, start:end] = doc + 1
      positions[b, start:end] = np.arange(end - start)
      mask[b, start + rng.integers(0, end - start + 1) : end] = 1
  batch = {'tokens': tokens, 'segment_ids': segments, 'positions': positions}
  if loss_mask:
    batch['loss_mask'] = mask
  return batch


def target_weights(batch) -> np.ndarray:
  """[B, T] 1.0 where token t + 1 continues t's non-padding document (and is marked)."""
  segments = np.asarray(batch['segment_ids'])
  same_doc = (segments[:, 1:] == segments[:, :-1]) & (segments[:, :-1] > 0)
  if 'loss_mask' in batch:
    same_doc &= np.asarray(batch['loss_mask'])[:, 1:] > 0
  return np.pad(same_doc, ((0, 0), (0, 1))).astype(np.float32)


def reference_loss_and_grads(graphdef, params, batch):
  """(loss, grads) of the token-weighted mean cross-entropy over the whole batch.

  The plain way, sharing nothing with clm_jax.model.loss or the train step: the
  full [B, T, V] logits on one device, optax's cross-entropy, `jax.grad`.
  `params` are in plain layer order.
  """
  tokens = np.asarray(batch['tokens'])
  targets = np.pad(tokens[:, 1:], ((0, 0), (0, 1)))
  weights = target_weights(batch)

  def loss_fn(params):
    logits = model_lib.apply(
      graphdef, params, tokens, np.asarray(batch['segment_ids']), np.asarray(batch['positions'])
    )
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return (losses * weights).sum() / weights.sum()

  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
  return float(loss), jax.device_get(grads)
