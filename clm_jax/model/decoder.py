"""The CodeLlama / LLaMA-2 decoder and its functional interface.

Blocks are stacked on a leading `layers` axis and run by one scan, so compile
time does not grow with depth. Training code holds plain nested dicts
(`params`); `apply` merges them with the graph inside the traced function.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from clm_jax import config as config_lib
from clm_jax.model import layers
from clm_jax.parallel import sharding

# What backward keeps of a block, by model.remat; the pipeline's stage uses the
# same table. 'none' never wraps the block in jax.checkpoint at all.
REMAT_POLICIES = {
  # Keep only the scan carry; recompute the whole block in backward.
  'full': jax.checkpoint_policies.nothing_saveable,
  # Keep the projections' outputs, recompute norms, rotary, the attention core
  # and the MLP's elementwise ops. By name, not "dots without batch
  # dimensions": the pipeline vmaps stages, which gives every projection one.
  'save_dots': jax.checkpoint_policies.save_only_these_names(*layers.PROJECTIONS),
}


class Decoder(nnx.Module):
  """Token embedding, L stacked blocks, final RMSNorm, untied LM head."""

  def __init__(self, cfg: config_lib.ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = layers.param(rngs, cfg, (cfg.vocab_size, cfg.d_model), ('vocab', 'embed'))

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
    def make_blocks(rngs):
      return layers.Block(cfg, rngs)

    self.blocks = make_blocks(rngs)
    self.final_norm = layers.RMSNorm(cfg, rngs)
    self.lm_head = layers.param(rngs, cfg, (cfg.d_model, cfg.vocab_size), ('embed', 'vocab'))

  def __call__(self, tokens_BT, segment_ids_BT, positions_BT) -> jax.Array:
    """Returns float32 logits [B, T, V]."""
    return self.logits(self.hidden(tokens_BT, segment_ids_BT, positions_BT))

  def hidden(self, tokens_BT, segment_ids_BT, positions_BT) -> jax.Array:
    """The final-normed hidden states [B, T, D] that the LM head reads."""
    x_BTD = self.embed_tokens(tokens_BT)
    graphdef, stacked = nnx.split(self.blocks)
    x_BTD = run_blocks(graphdef, stacked, x_BTD, segment_ids_BT, positions_BT, self.cfg.remat)
    return self.final_norm(x_BTD)

  def extend(self, tokens_BT, positions_BT, mask_BTS, cache: layers.KVCache, index):
    """(x_BTD, cache) after T new tokens per row, written to cache slots [index, index + T).

    Prefill (T = prompt length) and each decode step (T = 1) both run this.
    """
    x_BTD = self.embed_tokens(tokens_BT)
    graphdef, stacked = nnx.split(self.blocks)

    # The whole cache rides in the carry so that each layer writes only its
    # new slots in place; scanning it as xs -> ys would copy it every step.
    def body(carry, layer_state):
      x_BTD, cache = carry
      block_state, layer = layer_state
      block = nnx.merge(graphdef, block_state)
      return block.extend(x_BTD, positions_BT, mask_BTS, cache, layer, index), None

    num_layers = cache.k_LBSKH.shape[0]
    (x_BTD, cache), _ = jax.lax.scan(body, (x_BTD, cache), (stacked, jnp.arange(num_layers)))
    return self.final_norm(x_BTD), cache

  def embed_tokens(self, tokens_BT) -> jax.Array:
    """The embeddings [B, T, D] of tokens, in the compute dtype."""
    x_BTD = jnp.take(self.embed[...], tokens_BT, axis=0).astype(jnp.dtype(self.cfg.dtype))
    return sharding.constrain(x_BTD, ('batch', 'seq', None))

  def logits(self, x_XD: jax.Array) -> jax.Array:
    """The LM head on hidden states of any leading shape X; float32 out."""
    w_DV = self.lm_head[...].astype(x_XD.dtype)
    return jnp.einsum('...D,DV->...V', x_XD, w_DV, preferred_element_type=jnp.float32)


def run_blocks(graphdef, stacked, x_BTD, segment_ids_BT, positions_BT, remat: str):
  """Runs the blocks stacked along the leading axis of `stacked` (any length), in order.

  `graphdef` is nnx.split of Decoder.blocks; `remat` a key of REMAT_POLICIES or 'none'.
  """

  def body(x_BTD, block_state):
    block = nnx.merge(graphdef, block_state)
    return block(x_BTD, segment_ids_BT, positions_BT), None

  if remat != 'none':
    body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
  x_BTD, _ = jax.lax.scan(body, x_BTD, stacked)
  return x_BTD


def abstract(cfg: config_lib.ModelConfig):
  """(graphdef, params of jax.ShapeDtypeStruct, logical-axis tuples), allocating nothing."""
  # Under a current mesh nnx.eval_shape would read the logical axis names as
  # mesh axes; the answer must not depend on the caller's context.
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, nnx.Rngs(0))))
  axes = nnx.to_pure_dict(nnx.get_partition_spec(state))
  axes = jax.tree.map(tuple, axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  return graphdef, nnx.to_pure_dict(state), axes


def init(cfg: config_lib.ModelConfig, rng: jax.Array):
  """Fresh parameters as a nested dict of arrays (call under jit)."""
  _, state = nnx.split(Decoder(cfg, nnx.Rngs(params=rng)))
  return nnx.to_pure_dict(state)


def apply(graphdef, params, tokens_BT, segment_ids_BT, positions_BT) -> jax.Array:
  """Float32 logits [B, T, V] of the model with `params` on a packed batch."""
  return nnx.merge(graphdef, params)(tokens_BT, segment_ids_BT, positions_BT)


def init_cache(cfg: config_lib.ModelConfig, batch_size: int, length: int) -> layers.KVCache:
  """An empty KV cache of `length` slots per row, kv heads only, compute dtype."""
  shape = (cfg.num_layers, batch_size, length, cfg.num_kv_heads, cfg.head_dim)
  zeros = jnp.zeros(shape, jnp.dtype(cfg.dtype))
  # Rows over 'data' and kv heads over 'tensor', as the k/v projections split them.
  zeros = sharding.constrain(zeros, (None, 'batch', 'seq', 'kv_heads', None))
  return layers.KVCache(zeros, zeros)


def extend(graphdef, params, tokens_BT, positions_BT, mask_BTS, cache, index):
  """Float32 next-token logits [B, V] after T new tokens per row, and the cache.

  Only the last position's logits are computed: a prefill of long prompts
  would otherwise materialise [B, T, V] float32 logits it never reads.
  """
  model = nnx.merge(graphdef, params)
  x_BTD, cache = model.extend(tokens_BT, positions_BT, mask_BTS, cache, index)
  return model.logits(x_BTD[:, -1]), cache


def param_count(params) -> int:
  """Number of parameters in a (possibly abstract) params tree."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(params))
