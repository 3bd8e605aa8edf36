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
import numpy as np
import optax
from flax import nnx

from clm_jax import config as config_lib
from clm_jax.model import decoder as model_lib
from clm_jax.model import loss as loss_lib
from clm_jax.parallel import sharding
from clm_jax.train import optimizer as optimizer_lib
from clm_jax.train import pipeline


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  opt_state: optax.OptState


def _hidden_and_head(graphdef, params, batch):
  model = nnx.merge(graphdef, params)
  x_BTD = model.hidden(batch['tokens'], batch['segment_ids'], batch['positions'])
  return x_BTD, model.lm_head[...]


def token_losses(graphdef, params, batch, loss_chunk_len: int = 0):
  """Per-token cross-entropy [B, T] (float32) and the 0/1 weights of real targets."""
  x_BTD, w_DV = _hidden_and_head(graphdef, params, batch)
  targets_BT, weights_BT = loss_lib.targets(
    batch['tokens'], batch['segment_ids'], batch.get('loss_mask')
  )
  losses_BT = loss_lib.token_losses(x_BTD, w_DV, targets_BT, loss_chunk_len or x_BTD.shape[1])
  return losses_BT * weights_BT, weights_BT


def _split_microbatches(batch, schedule: pipeline.Schedule, microbatches: int):
  """[B, T] -> [A, K, B/M, T]: A passes of K micro-batches (M = A K).

  Micro-batch m takes rows m, M+m, 2M+m, ...: rows sit on the 'data' devices
  in contiguous blocks, and this interleaving keeps every micro-batch spread
  evenly over them with no data movement.
  """
  K = schedule.microbatches

  def split(x_BT):
    x = x_BT.reshape(x_BT.shape[0] // microbatches, microbatches, *x_BT.shape[1:])
    x = jnp.swapaxes(x, 0, 1)
    return x.reshape(microbatches // K, K, *x.shape[1:])

  return jax.tree.map(split, batch)


def grads_and_loss(graphdef, params, batch, schedule, microbatches: int, loss_chunk_len: int = 0):
  """(mean loss, real targets, grads) of the token-weighted loss over all micro-batches.

  Sums are accumulated in float32 over the pipeline passes and divided by the
  number of real targets once at the end, so the result equals one large batch.
  """

  def loss_fn(params, micro):
    return pipeline.loss_sum(params, graphdef, micro, schedule, loss_chunk_len)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def accumulate(carry, micro):
    loss_sum, count, grads = carry
    (loss, n), g = grad_fn(params, micro)
    micro_grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)
    return (loss_sum + loss, count + n, micro_grads), None

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)
  passes = _split_microbatches(batch, schedule, microbatches)
  (loss_sum, count, grads), _ = jax.lax.scan(accumulate, init, passes)
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
  pipeline_schedule: pipeline.Schedule,
  microbatches: int,
  loss_chunk_len: int = 0,
):
  """One optimizer step: (state, batch) -> (state, metrics). Pure; jit it."""
  loss, count, grads = grads_and_loss(
    graphdef, state.params, batch, pipeline_schedule, microbatches, loss_chunk_len
  )
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


def eval_step(params, batch, *, graphdef, pipeline_schedule, microbatches, loss_chunk_len=0):
  """(sum of held-out token losses, number of real targets), through the pipeline."""

  def one_pass(carry, micro):
    loss, n = pipeline.loss_sum(params, graphdef, micro, pipeline_schedule, loss_chunk_len)
    return (carry[0] + loss, carry[1] + n), None

  zero = jnp.zeros((), jnp.float32)
  passes = _split_microbatches(batch, pipeline_schedule, microbatches)
  return jax.lax.scan(one_pass, (zero, zero), passes)[0]


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
  pipeline_schedule: pipeline.Schedule
  # The model layer at each storage position of the stacked blocks (the
  # identity unless mesh.virtual_stages > 1); see clm_jax.train.pipeline.
  layer_order: np.ndarray
  init_state: Callable[[jax.Array], TrainState]
  # TrainState storage order <-> the plain layer order checkpoints hold, so a
  # checkpoint restores under any pipeline layout (identity when R = 1).
  to_checkpoint: Callable[[TrainState], TrainState]
  from_checkpoint: Callable[[TrainState], TrainState]
  train_step: Callable
  eval_step: Callable


def decay_mask(axes):
  """True for every parameter but norm scales (whose logical axis is 'norm')."""
  return jax.tree.map(lambda a: 'norm' not in a, axes, is_leaf=lambda a: isinstance(a, tuple))


def _reorder(permute, order, state_sh):
  if np.array_equal(order, np.arange(order.size)):
    return lambda state: state
  return jax.jit(lambda state: permute(state, order), out_shardings=state_sh)


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

  pipeline_schedule = pipeline.make_schedule(
    mesh.shape['pipeline'],
    c.mesh.virtual_stages,
    c.train.microbatches,
    c.mesh.pipeline_microbatches,
  )
  order = pipeline.layer_order(model_cfg.num_layers, mesh.shape['pipeline'], c.mesh.virtual_stages)

  def init(rng):
    params = pipeline.to_storage(model_lib.init(model_cfg, rng), order)
    return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params)
    )

  batch_sh = sharding.batch_sharding(mesh)
  step_fn = functools.partial(
    train_step,
    graphdef=graphdef,
    optimizer=optimizer,
    schedule=schedule,
    pipeline_schedule=pipeline_schedule,
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
    pipeline_schedule=pipeline_schedule,
    layer_order=order,
    init_state=jax.jit(init, out_shardings=state_sh),
    to_checkpoint=_reorder(pipeline.to_layer_order, order, state_sh),
    from_checkpoint=_reorder(pipeline.to_storage, order, state_sh),
    train_step=jax.jit(
      step_fn,
      in_shardings=(state_sh, batch_sh),
      out_shardings=(state_sh, replicated),
      donate_argnums=0,
    ),
    eval_step=jax.jit(
      functools.partial(
        eval_step,
        graphdef=graphdef,
        pipeline_schedule=pipeline_schedule,
        microbatches=c.train.microbatches,
        loss_chunk_len=c.train.loss_chunk_len,
      ),
      in_shardings=(param_sh, batch_sh),
      out_shardings=replicated,
    ),
  )
