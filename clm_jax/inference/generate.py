"""Generation with a KV cache: one jit runs the prefill and the decode loop.

Axis letters as in `clm_jax.model`, except P padded prompt length, M new tokens
per row, S cache slots. Prompts are left-padded so that every row writes the
same cache slot per step (one dynamic_update_slice, no per-row scatter); RoPE
positions count from each row's first real token, and pad slots are masked.
The decode loop is a while_loop in the same jit: no host round trip per token
(one compile per batch shape and setting). Callers add BOS (`format_infill` does).
"""

import contextlib
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from clm_jax import config as config_lib
from clm_jax.data import fim
from clm_jax.data import tokenizer as tokenizer_lib
from clm_jax.model import decoder as model_lib


def generate(
  cfg: config_lib.ModelConfig,
  params,
  prompts: Sequence[Sequence[int]] | np.ndarray,
  *,
  max_new_tokens: int,
  temperature: float = 0.0,
  top_k: int = 0,
  top_p: float = 1.0,
  stop_ids: Sequence[int] = (),
  pad_id: int = 0,
  seed: int = 0,
  max_len: int | None = None,
) -> list[list[int]]:
  """Continues each prompt; returns each row's new tokens, up to its first stop id (excluded).

  Args:
    params: In plain layer order (as `model.init` makes them), on one device or
      sharded on a mesh; the jit keeps their shardings.
    temperature: 0 is greedy; above 0 samples after the top-k and top-p filters
      (0 and 1 turn those off).
    seed: One key draws the whole batch per step, so a row's samples depend on
      the batch it is in.
    max_len: The most tokens (prompt + new) per row; None = longest prompt +
      max_new_tokens. Beyond `cfg.max_seq_len` RoPE extrapolates, untrained.
  """
  tokens_BP, pad_B = pad_left(prompts, pad_id, cfg.vocab_size)
  P = tokens_BP.shape[1]
  max_len = P + max_new_tokens if max_len is None else max_len
  num_new = min(max_new_tokens, max_len - P)
  if num_new < 1:
    raise ValueError(
      f'No room to generate: max_new_tokens={max_new_tokens}, max_len={max_len} and the '
      f'longest prompt has {P} tokens.'
    )
  _check_sampling(temperature, top_k, top_p)
  stop_ids = tuple(int(i) for i in stop_ids)
  with _mesh_context(params):
    out_BM = _generate(
      params,
      tokens_BP,
      pad_B,
      jax.random.key(seed),
      cfg=cfg,
      num_new=num_new,
      temperature=float(temperature),
      top_k=int(top_k),
      top_p=float(top_p),
      stop_ids=stop_ids,
      pad_id=int(pad_id),
    )
  return [_until_stop(row, stop_ids) for row in np.asarray(out_BM).tolist()]


def format_infill(
  tokenizer: tokenizer_lib.Tokenizer, prefix: str, suffix: str, spm: bool = False
) -> list[int]:
  """The infilling prompt: [BOS] + `fim.infill_prompt`, the training layout up to the middle.

  As CodeLlama's `infilling_prompt_tokens`; the model then writes the middle and <EOT>.
  """
  return [tokenizer.bos_id, *fim.infill_prompt(tokenizer, prefix, suffix, spm=spm)]


def infill(
  cfg: config_lib.ModelConfig,
  params,
  tokenizer: tokenizer_lib.Tokenizer,
  prefix: str,
  suffix: str,
  *,
  spm: bool = False,
  max_new_tokens: int,
  temperature: float = 0.0,
  top_k: int = 0,
  top_p: float = 1.0,
  seed: int = 0,
  max_len: int | None = None,
) -> str:
  """The text the model writes between `prefix` and `suffix`.

  Generates after `format_infill`'s prompt until <EOT> or EOS (neither is
  returned) or max_new_tokens; the other arguments are generate()'s. The
  middle continues a text, so it is decoded as a fragment (CodeLlama's
  `decode_infilling`): a ' ' it starts with is kept.
  """
  [middle] = generate(
    cfg,
    params,
    [format_infill(tokenizer, prefix, suffix, spm)],
    max_new_tokens=max_new_tokens,
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
    stop_ids=(tokenizer.sentinels['eot'], tokenizer.eos_id),
    pad_id=tokenizer.pad_id,
    seed=seed,
    max_len=max_len,
  )
  return tokenizer.decode_fragment(middle)


def pad_left(
  prompts: Sequence[Sequence[int]] | np.ndarray, pad_id: int, vocab_size: int
) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads prompts into int32 tokens [B, P] and their pad counts [B]."""
  rows = [[int(t) for t in prompt] for prompt in prompts]
  if not rows or not all(rows):
    raise ValueError('generate needs at least one prompt, each of at least one token.')
  bad = sorted({t for row in rows for t in row if not 0 <= t < vocab_size})
  if bad or not 0 <= pad_id < vocab_size:
    raise ValueError(f'Ids outside the vocabulary [0, {vocab_size}): {bad or [pad_id]}.')
  P = max(len(row) for row in rows)
  tokens_BP = np.full((len(rows), P), pad_id, np.int32)
  for b, row in enumerate(rows):
    tokens_BP[b, P - len(row) :] = row
  return tokens_BP, np.array([P - len(row) for row in rows], np.int32)


def prefill(cfg: config_lib.ModelConfig, params, tokens_BP, pad_B, cache_len: int):
  """Runs the left-padded prompts into a fresh cache; returns (float32 logits_BV, cache)."""
  B, P = tokens_BP.shape
  cache = model_lib.init_cache(cfg, B, cache_len)
  mask_BTS, positions_BT = _mask_and_positions(pad_B, 0, P, cache_len)
  return model_lib.extend(_graphdef(cfg), params, tokens_BP, positions_BT, mask_BTS, cache, 0)


def step(cfg: config_lib.ModelConfig, params, tokens_B, pad_B, cache, index):
  """Feeds one token per row into cache slot `index`; returns (logits_BV, cache)."""
  S = cache.k_LBSKH.shape[2]
  mask_BTS, positions_BT = _mask_and_positions(pad_B, index, 1, S)
  return model_lib.extend(
    _graphdef(cfg), params, tokens_B[:, None], positions_BT, mask_BTS, cache, index
  )


def sample(logits_BV, key, *, temperature: float, top_k: int = 0, top_p: float = 1.0):
  """Int32 tokens [B]: argmax at temperature 0, else a filtered softmax draw."""
  if temperature == 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = filter_logits(logits_BV / temperature, top_k, top_p)
  return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


def filter_logits(logits_BV, top_k: int = 0, top_p: float = 1.0):
  """Sets logits outside the top k, then outside the nucleus top_p, to -inf.

  The most likely token, and all ties at a cut-off, survive.
  """
  if top_k:
    kth_B1 = jax.lax.top_k(logits_BV, min(top_k, logits_BV.shape[-1]))[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
  if top_p < 1:
    sorted_BV = jnp.flip(jnp.sort(logits_BV, axis=-1), axis=-1)
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    # A token stays while the mass before it is at most top_p, as CodeLlama's
    # sample_top_p: the set reaches top_p with its last member.
    keep_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV <= top_p
    lowest_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    logits_BV = jnp.where(logits_BV < lowest_B1, -jnp.inf, logits_BV)
  return logits_BV


@functools.partial(
  jax.jit,
  static_argnames=('cfg', 'num_new', 'temperature', 'top_k', 'top_p', 'stop_ids', 'pad_id'),
)
def _generate(
  params, tokens_BP, pad_B, key, *, cfg, num_new, temperature, top_k, top_p, stop_ids, pad_id
):
  """The new tokens [B, M]: pad_id after a row's stop id and after the loop ends."""
  B, P = tokens_BP.shape
  draw = functools.partial(sample, temperature=temperature, top_k=top_k, top_p=top_p)
  # The last new token is never fed back, so it needs no slot.
  logits_BV, cache = prefill(cfg, params, tokens_BP, pad_B, P + num_new - 1)
  key, step_key = jax.random.split(key)
  token_B = draw(logits_BV, step_key)
  out_BM = jnp.full((B, num_new), pad_id, jnp.int32).at[:, 0].set(token_B)

  def unfinished(carry):
    i, _, done_B, _, _, _ = carry
    return (i < num_new) & ~jnp.all(done_B)

  def body(carry):
    i, token_B, done_B, out_BM, cache, key = carry
    logits_BV, cache = step(cfg, params, token_B, pad_B, cache, P + i - 1)
    key, step_key = jax.random.split(key)
    token_B = jnp.where(done_B, pad_id, draw(logits_BV, step_key))
    out_BM = jax.lax.dynamic_update_slice(out_BM, token_B[:, None], (0, i))
    return i + 1, token_B, done_B | _is_stop(token_B, stop_ids), out_BM, cache, key

  carry = (jnp.int32(1), token_B, _is_stop(token_B, stop_ids), out_BM, cache, key)
  return jax.lax.while_loop(unfinished, body, carry)[3]


def _mask_and_positions(pad_B, index, T: int, S: int):
  """The attention mask [B, T, S] and positions [B, T] of slots [index, index + T)."""
  slot_T = index + jnp.arange(T)
  slot_S = jnp.arange(S)
  real_BT = slot_T >= pad_B[:, None]
  real_BS = slot_S >= pad_B[:, None]
  # As attention.document_mask with padding as its own document, plus causality.
  mask_BTS = (real_BT[:, :, None] == real_BS[:, None, :]) & (slot_S <= slot_T[:, None])
  return mask_BTS, jnp.maximum(slot_T - pad_B[:, None], 0)


def _is_stop(tokens_B, stop_ids: tuple[int, ...]):
  done_B = jnp.zeros(tokens_B.shape, bool)
  for stop_id in stop_ids:
    done_B |= tokens_B == stop_id
  return done_B


def _until_stop(row: list[int], stop_ids: tuple[int, ...]) -> list[int]:
  for i, token in enumerate(row):
    if token in stop_ids:
      return row[:i]
  return row


def _check_sampling(temperature: float, top_k: int, top_p: float) -> None:
  # `not a <= x` also rejects NaN.
  if not temperature >= 0:
    raise ValueError(f'temperature={temperature} must be >= 0.')
  if not top_k >= 0:
    raise ValueError(f'top_k={top_k} must be >= 0 (0 = no top-k filter).')
  if not 0 < top_p <= 1:
    raise ValueError(f'top_p={top_p} must be in (0, 1] (1 = no nucleus filter).')


@functools.cache
def _graphdef(cfg: config_lib.ModelConfig):
  return model_lib.abstract(cfg)[0]


def _mesh_context(params):
  """The params' mesh as the current mesh, so the model's sharding constraints apply."""
  leaf = jax.tree.leaves(params)[0]
  spec = getattr(leaf, 'sharding', None)
  if isinstance(spec, jax.sharding.NamedSharding) and spec.mesh.size > 1:
    return jax.set_mesh(spec.mesh)
  return contextlib.nullcontext()
