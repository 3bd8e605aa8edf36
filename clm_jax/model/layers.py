"""The pieces of a LLaMA-2 decoder block, as Flax NNX modules.

Projections are 2-D matmuls over X tokens: XLA:CPU runs the backward of a
[B, T, D] einsum as a loop, 1.4x slower on bench_tiny's MLP (GPUs: the same).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from clm_jax import config as config_lib
from clm_jax.model import attention
from clm_jax.parallel import sharding


def param(rngs, cfg: config_lib.ModelConfig, shape, axes, init=None) -> nnx.Param:
  """A parameter with its logical axis names in `out_sharding` metadata.

  Eager sharding is off: the state is created under `jit(out_shardings=...)`
  computed from these names, never placed by Flax itself.
  """
  init = init or jax.nn.initializers.normal(cfg.init_std)
  value = init(rngs.params(), shape, jnp.dtype(cfg.param_dtype))
  return nnx.Param(value, out_sharding=axes, eager_sharding=False)


class RMSNorm(nnx.Module):
  """Root-mean-square norm computed in float32 (as LLaMA / HF Llama)."""

  def __init__(self, cfg: config_lib.ModelConfig, rngs: nnx.Rngs):
    self.scale = param(rngs, cfg, (cfg.d_model,), ('norm',), jax.nn.initializers.ones)
    self.eps = cfg.norm_eps

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    x = x_BTD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (x * self.scale[...].astype(jnp.float32)).astype(x_BTD.dtype)


def rotary(x_BTnH: jax.Array, positions_BT: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding in the Hugging Face layout (i rotates with i + H/2)."""
  half = x_BTnH.shape[-1] // 2
  inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles_BTh = positions_BT.astype(jnp.float32)[..., None] * inv_freq
  cos = jnp.cos(angles_BTh)[:, :, None, :]
  sin = jnp.sin(angles_BTh)[:, :, None, :]
  x = x_BTnH.astype(jnp.float32)
  x1, x2 = x[..., :half], x[..., half:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTnH.dtype)


def _project(x_XD: jax.Array, w_DnH: jax.Array) -> jax.Array:
  """x @ w for a [D, heads, H] weight, as one [D, heads * H] matmul."""
  return x_XD @ w_DnH.reshape(w_DnH.shape[0], -1).astype(x_XD.dtype)


# The outputs of the seven projections, by the names they are tagged with.
PROJECTIONS = ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj')


class KVCache(NamedTuple):
  """Every layer's keys and values for decoding, in the compute dtype.

  K kv heads only, never repeated to N: GQA's memory saving is its point at
  decode time. Slot s holds the (left-padded) row's s-th token.
  """

  k_LBSKH: jax.Array
  v_LBSKH: jax.Array


class Attention(nnx.Module):
  """Grouped-query self-attention with rotary positions and document masking."""

  def __init__(self, cfg: config_lib.ModelConfig, rngs: nnx.Rngs):
    D, N, K, H = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.wq = param(rngs, cfg, (D, N, H), ('embed', 'heads', 'head_dim'))
    self.wk = param(rngs, cfg, (D, K, H), ('embed', 'kv_heads', 'head_dim'))
    self.wv = param(rngs, cfg, (D, K, H), ('embed', 'kv_heads', 'head_dim'))
    self.wo = param(rngs, cfg, (N, H, D), ('heads', 'head_dim', 'embed'))
    self.cfg = cfg

  def __call__(self, x_BTD, segment_ids_BT, positions_BT) -> jax.Array:
    q_BTNH, k_BSKH, v_BSKH = self._qkv(x_BTD, positions_BT)
    out_BTNH = attention.attend(
      q_BTNH,
      k_BSKH,
      v_BSKH,
      segment_ids_BT,
      implementation=self.cfg.attention,
      max_segments=self.cfg.max_segments,
    )
    return self._out(out_BTNH, x_BTD.dtype)

  def extend(self, x_BTD, positions_BT, mask_BTS, cache: KVCache, layer, index):
    """Attends T new tokens over the cache after writing theirs to slots [index, index + T)."""
    q_BTNH, k_BTKH, v_BTKH = self._qkv(x_BTD, positions_BT)
    # Only the T new slots of the [L, B, S, K, H] cache are written: in the
    # decode loop's carry that is an in-place update, not a copy of the cache.
    start = (layer, 0, index, 0, 0)
    cache = KVCache(
      jax.lax.dynamic_update_slice(cache.k_LBSKH, k_BTKH[None].astype(cache.k_LBSKH.dtype), start),
      jax.lax.dynamic_update_slice(cache.v_LBSKH, v_BTKH[None].astype(cache.v_LBSKH.dtype), start),
    )
    # XLA rather than cuDNN: the cache needs an arbitrary mask (left padding),
    # which cuDNN's fused kernel does not take, and a one-token step reads the
    # cache once whichever kernel runs.
    out_BTNH = jax.nn.dot_product_attention(
      q_BTNH,
      cache.k_LBSKH[layer],
      cache.v_LBSKH[layer],
      mask=mask_BTS[:, None],
      implementation='xla',
    )
    return self._out(out_BTNH, x_BTD.dtype), cache

  def _qkv(self, x_BTD, positions_BT):
    """Rotated queries [B, T, N, H] and keys [B, T, K, H], and values [B, T, K, H]."""
    cfg = self.cfg
    B, T, D = x_BTD.shape
    N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    x_XD = x_BTD.reshape(B * T, D)
    # Named for the 'save_dots' remat policy (see PROJECTIONS).
    q_BTNH = checkpoint_name(_project(x_XD, self.wq[...]), 'q_proj').reshape(B, T, N, H)
    k_BTKH = checkpoint_name(_project(x_XD, self.wk[...]), 'k_proj').reshape(B, T, K, H)
    v_BTKH = checkpoint_name(_project(x_XD, self.wv[...]), 'v_proj').reshape(B, T, K, H)
    q_BTNH = sharding.constrain(q_BTNH, ('batch', 'seq', 'heads', None))
    q_BTNH = rotary(q_BTNH, positions_BT, cfg.rope_theta)
    k_BTKH = rotary(k_BTKH, positions_BT, cfg.rope_theta)
    return q_BTNH, k_BTKH, v_BTKH

  def _out(self, out_BTNH, dtype) -> jax.Array:
    """The output projection of the attended values, [B, T, D] in `dtype`."""
    B, T, N, H = out_BTNH.shape
    D = self.cfg.d_model
    wo_ZD = self.wo[...].reshape(N * H, D)
    out_XD = checkpoint_name(out_BTNH.reshape(B * T, N * H) @ wo_ZD.astype(dtype), 'o_proj')
    return sharding.constrain(out_XD.reshape(B, T, D), ('batch', 'seq', None))


class MLP(nnx.Module):
  """SwiGLU: down(silu(x @ gate) * (x @ up))."""

  def __init__(self, cfg: config_lib.ModelConfig, rngs: nnx.Rngs):
    D, F = cfg.d_model, cfg.mlp_dim
    self.w_gate = param(rngs, cfg, (D, F), ('embed', 'mlp'))
    self.w_up = param(rngs, cfg, (D, F), ('embed', 'mlp'))
    self.w_down = param(rngs, cfg, (F, D), ('mlp', 'embed'))

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    x_XD = x_BTD.reshape(-1, x_BTD.shape[-1])
    dtype = x_XD.dtype
    gate_XF = checkpoint_name(x_XD @ self.w_gate[...].astype(dtype), 'gate_proj')
    up_XF = checkpoint_name(x_XD @ self.w_up[...].astype(dtype), 'up_proj')
    h_XF = sharding.constrain(jax.nn.silu(gate_XF) * up_XF, ('batch', 'mlp'))
    out_XD = checkpoint_name(h_XF @ self.w_down[...].astype(dtype), 'down_proj')
    return sharding.constrain(out_XD.reshape(x_BTD.shape), ('batch', 'seq', None))


class Block(nnx.Module):
  """Pre-norm decoder block: x + attn(norm(x)), then h + mlp(norm(h))."""

  def __init__(self, cfg: config_lib.ModelConfig, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg, rngs)
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = RMSNorm(cfg, rngs)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x_BTD, segment_ids_BT, positions_BT) -> jax.Array:
    h_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), segment_ids_BT, positions_BT)
    return h_BTD + self.mlp(self.mlp_norm(h_BTD))

  def extend(self, x_BTD, positions_BT, mask_BTS, cache: KVCache, layer, index):
    """The block on T new tokens against a KV cache (see Attention.extend)."""
    attn_BTD, cache = self.attn.extend(
      self.attn_norm(x_BTD), positions_BT, mask_BTS, cache, layer, index
    )
    h_BTD = x_BTD + attn_BTD
    return h_BTD + self.mlp(self.mlp_norm(h_BTD)), cache
