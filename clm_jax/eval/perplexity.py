"""Perplexity of a loaded model on the held-out split of a config's data.

The same packed rows, loss and averaging (`train.hooks.mean_loss`) as
training's held-out evaluation: documents packed into rows of seq_len with segment ids,
the loss averaged over every target token, never across a document boundary.
"""

import math

import jax
import ml_collections
import numpy as np

from clm_jax.data import loader
from clm_jax.model import decoder as model_lib
from clm_jax.parallel import sharding
from clm_jax.train import hooks
from clm_jax.train import step as step_lib


def heldout(
  model,
  c: ml_collections.ConfigDict,
  *,
  max_batches: int = 0,
) -> dict:
  """Mean loss and perplexity of `model` (from `clm_jax.load`) on `c.data`'s held-out split.

  Args:
    model: A `clm_jax.Model` with a tokenizer.
    c: A config: its `data` section names the corpus, `train.seq_len` and
      `train.global_batch_size` shape the batches, `train.loss_chunk_len`
      bounds the logits held at once.
    max_batches: Stop after this many batches; 0 = one pass over the split
      (its last, partial batch dropped).

  Returns:
    {'loss', 'perplexity', 'tokens', 'batches'}.
  """
  if model.tokenizer is None:
    raise ValueError('perplexity needs the tokenizer the model was trained with.')
  ds = loader.make_dataset(
    c.data,
    model.tokenizer,
    seq_len=c.train.seq_len,
    batch_size=c.train.global_batch_size,
    split='heldout',
    seed=c.train.seed,
    repeat=False,
  )
  graphdef, _, _ = model_lib.abstract(model.config)

  @jax.jit
  def loss_sum(params, batch):
    losses, weights = step_lib.token_losses(graphdef, params, batch, c.train.loss_chunk_len)
    return losses.sum(), weights.sum()

  def batch_loss(batch):
    if model.mesh is None:
      return loss_sum(model.params, {k: np.asarray(v) for k, v in batch.items()})
    with jax.set_mesh(model.mesh):
      return loss_sum(model.params, sharding.host_to_global(batch, model.mesh))

  loss, count, batches = hooks.mean_loss(batch_loss, ds, max_batches)
  if not count:
    raise ValueError(
      f'the held-out split of data.source={c.data.source!r} gave no batch of '
      f'{c.train.global_batch_size} x {c.train.seq_len} tokens.'
    )
  return {'loss': loss, 'perplexity': math.exp(loss), 'tokens': int(count), 'batches': batches}
