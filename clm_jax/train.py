"""Train state, loss and the pure, jitted train step.

A batch is a dict of [B, T] int32 arrays: `tokens`, `segment_ids` (1.. per
packed document, 0 for padding) and `positions` (restarting at 0 in each
document). The target of token t is token t + 1 of the same document.
"""

import dataclasses
import functools
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from clm_jax import config as config_lib
from clm_jax import loss as loss_lib
from clm_jax import model as model_lib
from clm_jax import optimizer as optimizer_lib
from clm_jax import sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  opt_state: optax.OptState


def _targets(batch):
  """Next-token targets [B, T] and the 0/1 weights of the real ones."""
  tokens_BT, segments_BT = batch['tokens'], batch['segment_ids']
  T = tokens_BT.shape[1]
  targets_BT = jnp.roll(tokens_BT, -1, axis=1)
  # A real target is the next token of the same (non-padding) document.
  same_doc_BT = (jnp.roll(segments_BT, -1, axis=1) == segments_BT) & (segments_BT != 0)
  weights_BT = same_doc_BT & (jnp.arange(T) < T - 1)
  return targets_BT, weights_BT.astype(jnp.float32)


def _hidden_and_head(graphdef, params, batch):
  model = nnx.merge(graphdef, params)
  x_BTD = model.hidden(batch['tokens'], batch['segment_ids'], batch['positions'])
  return x_BTD, model.lm_head[...]


def token_losses(graphdef, params, batch, loss_chunk_len: int = 0):
  """Per-token cross-entropy [B, T] (float32) and the 0/1 weights of real targets."""
  x_BTD, w_DV = _hidden_and_head(graphdef, params, batch)
  targets_BT, weights_BT = _targets(batch)
  losses_BT = loss_lib.token_losses(x_BTD, w_DV, targets_BT, loss_chunk_len or x_BTD.shape[1])
  return losses_BT * weights_BT, weights_BT


def _loss_sum(params, graphdef, batch, loss_chunk_len):
  """(sum of the real targets' losses, their number), by the fused loss."""
  x_BTD, w_DV = _hidden_and_head(graphdef, params, batch)
  targets_BT, weights_BT = _targets(batch)
  chunk = loss_chunk_len or x_BTD.shape[1]
  return loss_lib.loss_sum(x_BTD, w_DV, targets_BT, weights_BT, chunk), weights_BT.sum()


def _split_microbatches(batch, microbatches: int):
  """[B, T] -> [M, B/M, T], where micro-batch m takes rows m, M+m, 2M+m, ...

  Rows sit on the 'data' devices in contiguous blocks; this interleaving
  keeps every micro-batch spread evenly over those devices with no data
  movement.
  """

  def split(x_BT):
    x = x_BT.reshape(x_BT.shape[0] // microbatches, microbatches, *x_BT.shape[1:])
    return jnp.swapaxes(x, 0, 1)

  return jax.tree.map(split, batch)


def grads_and_loss(graphdef, params, batch, microbatches: int, loss_chunk_len: int = 0):
  """Gradient of the token-weighted mean loss over all micro-batches.

  Sums of losses and gradients are accumulated in float32 over a scan, and
  divided by the number of real targets once at the end, so the result
  equals one large batch.
  """
  grad_fn = jax.value_and_grad(_loss_sum, has_aux=True)

  def accumulate(carry, micro):
    loss_sum, count, grads = carry
    (loss, n), g = grad_fn(params, graphdef, micro, loss_chunk_len)
    micro_grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)
    return (loss_sum + loss, count + n, micro_grads), None

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)
  micro = _split_microbatches(batch, microbatches)
  (loss_sum, count, grads), _ = jax.lax.scan(accumulate, init, micro)
  denom = jnp.maximum(count, 1.0)
  grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, params)
  return loss_sum / denom, count, grads


def train_step(
  state: TrainState,
  batch,
  *,
  graphdef,
  optimizer: optax.GradientTransformation,
  schedule: optax.Schedule,
  microbatches: int,
  loss_chunk_len: int = 0,
):
  """One optimizer step: (state, batch) -> (state, metrics). Pure; jit it."""
  loss, count, grads = grads_and_loss(graphdef, state.params, batch, microbatches, loss_chunk_len)
  applied = state.step - state.opt_state.total_notfinite
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {
    'loss': loss,
    'grad_norm': optax.tree.norm(grads),
    'lr': schedule(applied),
    'target_tokens': count,
    # Non-finite steps are skipped by apply_if_finite; the loop stops the run
    # after train.max_nonfinite of them in a row.
    'nonfinite_in_a_row': opt_state.notfinite_count,
    'nonfinite_total': opt_state.total_notfinite,
  }
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch, *, graphdef, loss_chunk_len: int = 0):
  """(sum of held-out token losses, number of real targets)."""
  return _loss_sum(params, graphdef, batch, loss_chunk_len)


@dataclasses.dataclass
class Setup:
  """Everything the loop needs, derived once from a validated config."""

  mesh: jax.sharding.Mesh
  model_cfg: config_lib.ModelConfig
  param_count: int
  graphdef: object
  schedule: optax.Schedule
  optimizer: optax.GradientTransformation
  state_shardings: TrainState
  init_state: Callable[[jax.Array], TrainState]
  train_step: Callable
  eval_step: Callable


def decay_mask(axes):
  """True for every parameter but norm scales (whose logical axis is 'norm')."""
  return jax.tree.map(lambda a: 'norm' not in a, axes, is_leaf=lambda a: isinstance(a, tuple))


def setup(c, mesh: jax.sharding.Mesh) -> Setup:
  """Builds the model, optimizer, state shardings and jitted functions."""
  model_cfg = config_lib.ModelConfig.from_config(c.model)
  graphdef, abstract_params, axes = model_lib.abstract(model_cfg)
  schedule = optimizer_lib.make_schedule(c.optim, c.train.steps)
  optimizer = optimizer_lib.make_optimizer(c.optim, schedule, decay_mask(axes))

  param_sh = sharding.param_shardings(axes, abstract_params, mesh, sharding.rules_for(c.mesh))
  replicated = sharding.replicated(mesh)
  abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
  opt_sh = optax.tree_utils.tree_map_params(
    optimizer,
    lambda _, s: s,
    abstract_opt,
    param_sh,
    transform_non_params=lambda _: replicated,
  )
  state_sh = TrainState(step=replicated, params=param_sh, opt_state=opt_sh)

  def init(rng):
    params = model_lib.init(model_cfg, rng)
    return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params)
    )

  batch_sh = sharding.batch_sharding(mesh)
  step_fn = functools.partial(
    train_step,
    graphdef=graphdef,
    optimizer=optimizer,
    schedule=schedule,
    microbatches=c.train.microbatches,
    loss_chunk_len=c.train.loss_chunk_len,
  )
  return Setup(
    mesh=mesh,
    model_cfg=model_cfg,
    param_count=model_lib.param_count(abstract_params),
    graphdef=graphdef,
    schedule=schedule,
    optimizer=optimizer,
    state_shardings=state_sh,
    init_state=jax.jit(init, out_shardings=state_sh),
    train_step=jax.jit(
      step_fn,
      in_shardings=(state_sh, batch_sh),
      out_shardings=(state_sh, replicated),
      donate_argnums=0,
    ),
    eval_step=jax.jit(
      functools.partial(eval_step, graphdef=graphdef, loss_chunk_len=c.train.loss_chunk_len),
      in_shardings=(param_sh, batch_sh),
      out_shardings=replicated,
    ),
  )
