"""Cross-entropy of the LM head, computed over chunks of the sequence.

The [B, T, V] float32 logits are the model's largest activation (1 GB per
8,192-token row at vocab 32,000), so they are never built whole. `loss_sum`,
the training path, is a fused linear cross-entropy: its forward also computes
the gradients chunk by chunk, so backward makes no second pass over the logits
(3 vocab-sized matmuls per chunk, not 4; bench_tiny's step 1.2x faster on CPU).
"""

import functools

import jax
import jax.numpy as jnp

from clm_jax.parallel import sharding


def _by_chunk(a_BT_, chunk):
  """[B, T, ...] -> [C, B, c, ...]."""
  B, T = a_BT_.shape[:2]
  return jnp.moveaxis(a_BT_.reshape(B, T // chunk, chunk, *a_BT_.shape[2:]), 1, 0)


def _from_chunks(a_CBc_):
  """[C, B, c, ...] -> [B, T, ...]."""
  C, B, c = a_CBc_.shape[:3]
  return jnp.moveaxis(a_CBc_, 0, 1).reshape(B, C * c, *a_CBc_.shape[3:])


def _logits(x_BcD, w_DV):
  # Rows as a 2-D matmul: XLA:CPU runs it faster than the 3-D einsum.
  x_XD = x_BcD.reshape(-1, x_BcD.shape[-1])
  logits_XV = jnp.matmul(x_XD, w_DV.astype(x_XD.dtype), preferred_element_type=jnp.float32)
  return sharding.constrain(logits_XV, ('batch', 'vocab'))


def _losses(logits_XV, targets_X):
  lse_X = jax.nn.logsumexp(logits_XV, axis=-1)
  target_X = jnp.take_along_axis(logits_XV, targets_X[:, None], axis=-1)[:, 0]
  return lse_X, lse_X - target_X


def token_losses(x_BTD, w_DV, targets_BT, chunk: int):
  """Float32 cross-entropy [B, T] of the logits x @ w against targets."""

  @jax.checkpoint
  def step(_, xs):
    x_BcD, targets_Bc = xs
    _, losses_X = _losses(_logits(x_BcD, w_DV), targets_Bc.reshape(-1))
    return None, losses_X.reshape(targets_Bc.shape)

  _, losses_CBc = jax.lax.scan(step, None, (_by_chunk(x_BTD, chunk), _by_chunk(targets_BT, chunk)))
  return _from_chunks(losses_CBc)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def loss_sum(x_BTD, w_DV, targets_BT, weights_BT, chunk: int):
  """sum(weights * cross-entropy(x @ w, targets)), with a fused gradient."""
  return (token_losses(x_BTD, w_DV, targets_BT, chunk) * weights_BT).sum()


def _loss_sum_fwd(x_BTD, w_DV, targets_BT, weights_BT, chunk):
  D, V = w_DV.shape

  def step(dw_DV, xs):
    x_BcD, targets_Bc, weights_Bc = xs
    targets_X, weights_X = targets_Bc.reshape(-1), weights_Bc.reshape(-1)
    logits_XV = _logits(x_BcD, w_DV)
    lse_X, losses_X = _losses(logits_XV, targets_X)
    # d(loss)/d(logits) = softmax - one_hot(target), per weighted row.
    probs_XV = jnp.exp(logits_XV - lse_X[:, None])
    one_hot_XV = jnp.arange(V) == targets_X[:, None]
    dlogits_XV = ((probs_XV - one_hot_XV) * weights_X[:, None]).astype(x_BcD.dtype)
    x_XD = x_BcD.reshape(-1, D)
    dx_XD = dlogits_XV @ w_DV.astype(x_BcD.dtype).T
    dw_DV = dw_DV + jnp.matmul(x_XD.T, dlogits_XV, preferred_element_type=jnp.float32)
    return dw_DV, ((losses_X * weights_X).sum(), dx_XD.reshape(x_BcD.shape))

  xs = (
    _by_chunk(x_BTD, chunk),
    _by_chunk(targets_BT, chunk),
    _by_chunk(weights_BT, chunk),
  )
  dw_DV, (sums_C, dx_CBcD) = jax.lax.scan(step, jnp.zeros((D, V), jnp.float32), xs)
  residuals = (_from_chunks(dx_CBcD), dw_DV.astype(w_DV.dtype))
  return sums_C.sum(), residuals


def _loss_sum_bwd(chunk, residuals, g):
  del chunk
  dx_BTD, dw_DV = residuals
  # Targets are integers and weights are data: neither gets a gradient.
  return (g * dx_BTD).astype(dx_BTD.dtype), (g * dw_DV).astype(dw_DV.dtype), None, None


loss_sum.defvjp(_loss_sum_fwd, _loss_sum_bwd)


def targets(tokens_BT, segment_ids_BT, loss_mask_BT=None):
  """Next-token targets [B, T] and the 0/1 float weights of the real ones.

  With `loss_mask_BT` (instruction data: 1 on answers), only marked targets count.
  """
  T = tokens_BT.shape[1]
  targets_BT = jnp.roll(tokens_BT, -1, axis=1)
  # A real target is the next token of the same (non-padding) document.
  same_doc_BT = (jnp.roll(segment_ids_BT, -1, axis=1) == segment_ids_BT) & (segment_ids_BT != 0)
  weights_BT = same_doc_BT & (jnp.arange(T) < T - 1)
  if loss_mask_BT is not None:
    weights_BT &= jnp.roll(loss_mask_BT, -1, axis=1) > 0
  return targets_BT, weights_BT.astype(jnp.float32)
