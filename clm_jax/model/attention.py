"""The attention core of training: packed documents, each causal on its own.

`model.attention` picks 'xla' (a dense [B, 1, T, S] document mask; runs
everywhere) or 'cudnn': flash attention on the packed ("THD") layout, where
each row's runs of equal segment ids (M; the padding tail is one, so its output
is defined) are given by lengths and offsets: no T x S mask, and blocks outside a
document are skipped. (jax's public API would turn the mask into a dense bias,
defeating flash attention.) 'cudnn' needs Hopper+, cuDNN >= 9.6 and bf16/fp16.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention

from clm_jax import config as config_lib


def document_mask(segment_ids_BT: jax.Array) -> jax.Array:
  """[B, 1, T, S] True where query and key are in the same packed document.

  Padding (segment 0) sees only padding, which keeps every softmax row
  non-empty; its targets are masked in the loss.
  """
  return (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])[:, None]


def segment_layout(segment_ids_BT: jax.Array, max_segments: int) -> tuple[jax.Array, jax.Array]:
  """cuDNN's packed layout of each row's runs: int32 (seqlens_BM, offsets_BM1).

  Each run's length and start, -1 after the row's last run; runs past the M-th
  are dropped (`check_segments` rejects such batches on the host). The last
  offsets column is always -1: jax takes M + 1 columns but only the starts, and
  an end offset there would misalign every later row once jax concatenates them.
  """
  B, T = segment_ids_BT.shape
  boundary_BT = jnp.concatenate(
    [jnp.ones((B, 1), bool), segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1
  )
  run_BT = jnp.cumsum(boundary_BT, axis=1, dtype=jnp.int32) - 1
  row_BT = jnp.broadcast_to(jnp.arange(B, dtype=jnp.int32)[:, None], (B, T))
  length_BM = jnp.zeros((B, max_segments), jnp.int32).at[row_BT, run_BT].add(1, mode='drop')
  # Runs tile the row in order, so each starts where the previous ones end.
  start_BM = jnp.cumsum(length_BM, axis=1, dtype=jnp.int32) - length_BM
  present_BM = length_BM > 0
  seqlens_BM = jnp.where(present_BM, length_BM, -1)
  offsets_BM = jnp.where(present_BM, start_BM, -1)
  offsets_BM1 = jnp.pad(offsets_BM, ((0, 0), (0, 1)), constant_values=-1)
  return seqlens_BM, offsets_BM1


def check_segments(segment_ids: np.ndarray, max_segments: int) -> None:
  """Raises ConfigError if a row of [..., T] segment ids has over `max_segments` runs.

  On the host, before a batch is sent: the runs past the M-th would get no
  attention output at all, so such a batch must never train.
  """
  ids = np.asarray(segment_ids)
  ids = ids.reshape(-1, ids.shape[-1])
  if not ids.size:
    return
  runs = 1 + np.count_nonzero(ids[:, 1:] != ids[:, :-1], axis=1)
  row = int(runs.argmax())
  if runs[row] > max_segments:
    raise config_lib.ConfigError(
      f'row {row} of the batch packs {runs[row]} documents (runs of segment ids, padding '
      f"included) but model.max_segments={max_segments}, the most model.attention='cudnn' "
      f'is compiled for; raise model.max_segments to at least {runs[row]}.'
    )


def attend(
  q_BTNH: jax.Array,
  k_BSKH: jax.Array,
  v_BSKH: jax.Array,
  segment_ids_BT: jax.Array,
  *,
  implementation: str,
  max_segments: int,
) -> jax.Array:
  """Causal attention within each packed document, [B, T, N, H] in q's dtype.

  q and k come rotated; S = T. `max_segments` matters to 'cudnn' only.
  """
  if implementation == 'xla':
    # The softmax runs in float32 inside dot_product_attention. GQA is native:
    # the K kv heads are shared by N / K query heads each, never repeated.
    return jax.nn.dot_product_attention(
      q_BTNH,
      k_BSKH,
      v_BSKH,
      mask=document_mask(segment_ids_BT),
      is_causal=True,
      implementation='xla',
    )
  if implementation == 'cudnn':
    seqlens_BM, offsets_BM1 = segment_layout(segment_ids_BT, max_segments)
    return _packed_attention(q_BTNH, k_BSKH, v_BSKH, seqlens_BM, offsets_BM1)
  raise ValueError(f"model.attention={implementation!r} is not 'xla' or 'cudnn'")


# cuDNN on the packed layout, made safe under jax.vmap and jax.grad. The
# pipeline vmaps the layers over stages, and jax's batching rule for the cuDNN
# primitive does not fold [P, B, M] lengths and offsets into the batch; so a
# custom_vmap folds every vmapped axis into B, wrapped in a custom_vjp (which
# custom_vmap lacks) whose backward is jax's cuDNN VJP, recomputing the forward
# once: the price of using only the cuDNN module's public function.


def _cudnn(q_BTNH, k_BSKH, v_BSKH, seqlens_BM, offsets_BM1):
  """jax's cuDNN attention for plain (un-vmapped) [B, ...] arrays."""
  N, K = q_BTNH.shape[2], k_BSKH.shape[2]
  packed = seqlens_BM.shape[1] > 1
  if packed:
    mask_type = cudnn_attention.MaskType.PADDING_CAUSAL
    layout = dict(q_seqlen=seqlens_BM, kv_seqlen=seqlens_BM)
    layout.update(q_offsets=offsets_BM1, kv_offsets=offsets_BM1)
    if K != N and not _kv_offsets_take_kv_stride():
      # This jax scales kv offsets by the query heads' stride; with N query
      # heads on the keys too, that stride is right.
      k_BSKH, v_BSKH = (jnp.repeat(x, N // K, axis=2) for x in (k_BSKH, v_BSKH))
  else:
    # M = 1: `check_segments` lets through only rows that are one run.
    mask_type = cudnn_attention.MaskType.CAUSAL
    layout = {}
  try:
    return cudnn_attention.dot_product_attention(
      q_BTNH,
      k_BSKH,
      v_BSKH,
      scale=1.0 / np.sqrt(q_BTNH.shape[-1]),
      mask_type=mask_type,
      qkv_layout='BTNH',
      **layout,
    )
  except (RuntimeError, NotImplementedError, ValueError) as e:
    raise RuntimeError(
      f"model.attention='cudnn' cannot run here: {e}. It needs a Hopper or newer NVIDIA "
      "GPU, cuDNN >= 9.6 and bf16/fp16 compute; set model.attention='xla' otherwise."
    ) from e


@functools.cache
def _kv_offsets_take_kv_stride() -> bool:
  """Whether jax scales packed kv offsets by the keys' own per-token stride.

  jax 0.10 scales both by the queries' N * H, silently wrong with GQA
  (jax-ml/jax#39521). Probed on a tiny case, not by version, so a fixed jax
  gets native GQA at once.
  """
  q = jax.ShapeDtypeStruct((1, 4, 2, 8), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((1, 4, 1, 8), jnp.bfloat16)
  seqlens = np.array([[2, 2]], np.int32)
  offsets = np.array([[0, 2, -1]], np.int32)
  try:
    with jax.ensure_compile_time_eval():
      kv_offsets = cudnn_attention._fix_seqlen_offsets(seqlens, seqlens, offsets, offsets, q, k)[3]
    return int(kv_offsets.reshape(-1)[1]) == 2 * 1 * 8  # The second segment's start x K x H.
  except Exception:  # A reworked private helper: repeating kv heads is always right.
    return False


def _fold(axis_size, in_batched, args):
  """Merges a vmapped leading axis into each array's batch axis."""
  out = []
  for x, batched in zip(args, in_batched, strict=True):
    if not batched:
      x = jnp.broadcast_to(x, (axis_size, *x.shape))
    out.append(x.reshape(axis_size * x.shape[1], *x.shape[2:]))
  return out


def _unfold(axis_size, x):
  return x.reshape(axis_size, x.shape[0] // axis_size, *x.shape[1:])


@jax.custom_batching.custom_vmap
def _forward(q_BTNH, k_BSKH, v_BSKH, seqlens_BM, offsets_BM1):
  return _cudnn(q_BTNH, k_BSKH, v_BSKH, seqlens_BM, offsets_BM1)


@_forward.def_vmap
def _forward_vmap(axis_size, in_batched, *args):
  # Calling _forward again, not _cudnn, handles vmaps nested any deep.
  return _unfold(axis_size, _forward(*_fold(axis_size, in_batched, args))), True


@jax.custom_batching.custom_vmap
def _backward(q_BTNH, k_BSKH, v_BSKH, seqlens_BM, offsets_BM1, g_BTNH):
  _, vjp = jax.vjp(lambda q, k, v: _cudnn(q, k, v, seqlens_BM, offsets_BM1), q_BTNH, k_BSKH, v_BSKH)
  return vjp(g_BTNH)


@_backward.def_vmap
def _backward_vmap(axis_size, in_batched, *args):
  grads = _backward(*_fold(axis_size, in_batched, args))
  return tuple(_unfold(axis_size, g) for g in grads), (True,) * len(grads)


@jax.custom_vjp
def _packed_attention(q_BTNH, k_BSKH, v_BSKH, seqlens_BM, offsets_BM1):
  return _forward(q_BTNH, k_BSKH, v_BSKH, seqlens_BM, offsets_BM1)


def _packed_attention_fwd(*args):
  return _forward(*args), args


def _packed_attention_bwd(args, g_BTNH):
  return (*_backward(*args, g_BTNH), None, None)  # No cotangents for the int layout.


_packed_attention.defvjp(_packed_attention_fwd, _packed_attention_bwd)
