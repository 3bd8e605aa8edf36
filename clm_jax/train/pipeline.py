"""The pipeline schedule: micro-batches flowing through layer stages.

Here C is layers per chunk (L = R * P * C) and K micro-batches in flight.
Stages are a vmapped axis sharded over 'pipeline' (as MaxText): each iteration
every stage runs its chunk, then activations roll one stage on (a
collective-permute); parameters never move. GPipe forwards run in one scan,
backwards by its autodiff. Circular (R > 1): device s holds chunks s, s + P, ...
and groups of P micro-batches go round the ring R times together, so the last
stage's output is what stage 0 needs next, and the bubble shrinks to
(P - 1) / (R * K + P - 1). One stage is the same code, not a separate path.
Blocks are stored [L, ...] in storage order (`layer_order`); checkpoints hold
plain layer order, so any layout restores into any other.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from clm_jax.model import decoder as model_lib
from clm_jax.model import loss as loss_lib
from clm_jax.parallel import sharding


@dataclasses.dataclass(frozen=True)
class Schedule:
  """How the layers split into stages and how many micro-batches are in flight."""

  stages: int  # P: devices along the 'pipeline' mesh axis.
  virtual_stages: int  # R: chunks of layers per device.
  microbatches: int  # K: micro-batches per pass through the pipeline.

  @property
  def iterations(self) -> int:
    """I: steps of the schedule loop, the filling and draining included."""
    return self.virtual_stages * self.microbatches + self.stages - 1

  @property
  def bubble(self) -> float:
    """The fraction of stage-iterations that do no useful work."""
    return (self.stages - 1) / self.iterations


def make_schedule(
  stages: int, virtual_stages: int, microbatches: int, per_pass: int = 0
) -> Schedule:
  """The schedule for `microbatches` micro-batches per optimizer step.

  With several stages, `per_pass` of them (0 = all) go through together: more
  in flight is a smaller bubble but more stage inputs held. With one stage, one
  at a time: plain gradient accumulation.
  """
  if stages == 1:
    return Schedule(1, virtual_stages, 1)
  return Schedule(stages, virtual_stages, per_pass or microbatches)


def layer_order(num_layers: int, stages: int, virtual_stages: int) -> np.ndarray:
  """The model layer at each storage position (identity when R = 1)."""
  chunk = num_layers // (stages * virtual_stages)
  s = np.arange(stages)[:, None, None]
  r = np.arange(virtual_stages)[None, :, None]
  j = np.arange(chunk)[None, None, :]
  return ((r * stages + s) * chunk + j).reshape(-1)


def to_storage(tree, order: np.ndarray):
  """Plain layer order -> storage order, for every leaf under a 'blocks' key of `tree`."""
  return _permute_blocks(tree, order)


def to_layer_order(tree, order: np.ndarray):
  """Storage order -> plain layer order (what checkpoints and exports hold)."""
  return _permute_blocks(tree, np.argsort(order))


def _permute_blocks(tree, index: np.ndarray):
  if np.array_equal(index, np.arange(index.size)):
    return tree

  def permute(path, x):
    in_blocks = any(getattr(key, 'key', None) == 'blocks' for key in path)
    return jnp.take(x, index, axis=0) if in_blocks else x

  return jax.tree_util.tree_map_with_path(permute, tree)


def loss_sum(params, graphdef, batch_KBT, schedule: Schedule, loss_chunk_len: int = 0):
  """(sum of the real targets' losses, their number) over K micro-batches.

  `params` hold blocks in storage order; `batch_KBT` values are [K, B, T];
  `loss_chunk_len` 0 means T.
  """
  model = nnx.merge(graphdef, params)
  cfg = model.cfg
  P, R, K = schedule.stages, schedule.virtual_stages, schedule.microbatches
  C = cfg.num_layers // (P * R)
  tokens_KBT, segments_KBT, positions_KBT = (
    batch_KBT[k] for k in ('tokens', 'segment_ids', 'positions')
  )
  _, B, T = tokens_KBT.shape
  # Pre-training batches have no 'loss_mask': every real target counts.
  targets_KBT, weights_KBT = jax.vmap(loss_lib.targets)(
    tokens_KBT, segments_KBT, batch_KBT.get('loss_mask')
  )
  blocks_graphdef, blocks = nnx.split(model.blocks)
  # Storage [L, ...] is [P, R, C, ...] row-major: the reshape moves no data.
  w_PRC = jax.tree.map(
    lambda x: sharding.constrain_stage(x.reshape(P, R, C, *x.shape[1:])), nnx.to_pure_dict(blocks)
  )
  w_DV = model.lm_head[...]
  chunk = loss_chunk_len or T

  def stage(w_RC, repeat, x_BTD, segment_ids_BT, positions_BT):
    # The chunk is picked inside the checkpointed stage and never saved:
    # saved, the pick would be a residual of every iteration, the stage's
    # weights held I times over. With one repeat the pick is static.
    w_C = jax.tree.map(
      lambda w: checkpoint_name(w[0] if R == 1 else w[repeat], 'stage_weights'), w_RC
    )
    return model_lib.run_blocks(
      blocks_graphdef, w_C, x_BTD, segment_ids_BT, positions_BT, cfg.remat
    )

  if schedule.iterations > 1:
    # Across iterations keep what the remat policy keeps of the stage (with
    # 'full' only its input; the layers inside keep theirs only while that
    # stage's backward runs), never its picked weights.
    stage = jax.checkpoint(stage, policy=_stage_policy(cfg.remat))
  stages = jax.vmap(stage, spmd_axis_name=sharding.stage_mesh_axis())
  embed = jax.vmap(model.embed_tokens, spmd_axis_name=sharding.stage_mesh_axis())

  def stage_loss(y_BTD, targets_BT, weights_BT):
    # The final norm is recomputed in backward: kept, its float32
    # intermediates would be 4x the stream's bytes per iteration.
    x_BTD = jax.checkpoint(model.final_norm)(y_BTD)
    return loss_lib.loss_sum(x_BTD, w_DV, targets_BT, weights_BT, chunk)

  stage_losses = jax.vmap(stage_loss, spmd_axis_name=sharding.stage_mesh_axis())

  def iteration(carry, t):
    x_PBTD, total, count = carry
    k_P = t - jnp.arange(P)  # The work item each stage takes now.
    valid_P = (k_P >= 0) & (k_P < R * K)
    k_P = jnp.clip(k_P, 0, R * K - 1)
    micro_P = (k_P // (P * R)) * P + k_P % P
    repeat_P = (k_P // P) % R
    # Stage 0 starts a micro-batch or goes on with the last stage's previous
    # output. Every stage selects locally, so no activation crosses devices.
    fresh_PBTD = embed(tokens_KBT[micro_P])
    take_fresh_P = (jnp.arange(P) == 0) & (repeat_P == 0)
    x_PBTD = jnp.where(take_fresh_P[:, None, None, None], fresh_PBTD, x_PBTD)
    y_PBTD = stages(w_PRC, repeat_P, x_PBTD, segments_KBT[micro_P], positions_KBT[micro_P])
    y_PBTD = sharding.constrain(y_PBTD, ('stage', 'batch', 'seq', None))
    # A micro-batch is done when the last stage ran its last repeat. The loss
    # is vmapped over stages with the others' weights zero, so each stage
    # reads only its own output: no broadcast of the last stage's activations.
    done_P = valid_P & (repeat_P == R - 1) & (jnp.arange(P) == P - 1)
    weights_PBT = weights_KBT[micro_P] * done_P[:, None, None]
    losses_P = stage_losses(y_PBTD, targets_KBT[micro_P], weights_PBT)
    total, count = total + losses_P.sum(), count + weights_PBT.sum()
    x_PBTD = jnp.roll(y_PBTD, 1, axis=0)  # Stage s's output to stage s + 1.
    return (x_PBTD, total, count), None

  x_PBTD = jnp.zeros((P, B, T, cfg.d_model), jnp.dtype(cfg.dtype))
  x_PBTD = sharding.constrain(x_PBTD, ('stage', 'batch', 'seq', None))
  zero = jnp.zeros((), jnp.float32)
  (_, total, count), _ = jax.lax.scan(
    iteration, (x_PBTD, zero, zero), jnp.arange(schedule.iterations)
  )
  return total, count


def _stage_policy(remat: str):
  """The model's remat policy for a stage, never saving its picked weights (even under 'none')."""
  if remat == 'none':
    return jax.checkpoint_policies.save_anything_except_these_names('stage_weights')
  return model_lib.REMAT_POLICIES[remat]
