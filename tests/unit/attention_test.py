"""The attention core: the packed layout against hand-computed and dense references.

cuDNN itself runs only in the GPU test at the end. On CPU, the 'cudnn' path's
own code (layout, padding as a segment, the vmap folding, the gradient, the GQA
guard) runs against a stand-in for jax's cuDNN function that follows its
documented packed semantics with a dense mask.
"""

import inspect

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from clm_jax import config as config_lib
from clm_jax.model import attention
from clm_jax.parallel import sharding
from clm_jax.train import step as step_lib

MaskType = attention.cudnn_attention.MaskType


def _rows(rng, B, T, max_docs):
  """Random packed rows: 1..max_docs documents of random lengths, maybe a padding tail."""
  ids = np.zeros((B, T), np.int32)
  for b in range(B):
    docs = rng.integers(1, max_docs + 1)
    end = T - rng.integers(0, T // 4) if rng.random() < 0.5 else T
    cuts = np.sort(rng.choice(np.arange(1, end), docs - 1, replace=False))
    bounds = [0, *cuts, end]
    for d in range(docs):
      ids[b, bounds[d] : bounds[d + 1]] = d + 1
  return ids


def test_segment_layout_on_hand_written_rows():
  ids = np.array(
    [
      [1, 1, 1, 2, 2, 3, 0, 0],  # three documents and a padding tail
      [1, 1, 1, 1, 1, 1, 1, 1],  # one document fills the row
      [1, 2, 3, 4, 4, 4, 4, 0],  # exactly max_segments = 5 runs
      [0, 0, 0, 0, 0, 0, 0, 0],  # all padding
    ],
    np.int32,
  )
  seqlens, offsets = jax.jit(attention.segment_layout, static_argnums=1)(ids, 5)
  np.testing.assert_array_equal(
    seqlens,
    [
      [3, 2, 1, 2, -1],
      [8, -1, -1, -1, -1],
      [1, 1, 1, 4, 1],
      [8, -1, -1, -1, -1],
    ],
  )
  np.testing.assert_array_equal(
    offsets,
    [
      [0, 3, 5, 6, -1, -1],
      [0, -1, -1, -1, -1, -1],
      [0, 1, 2, 3, 7, -1],
      [0, -1, -1, -1, -1, -1],
    ],
  )
  assert seqlens.dtype == offsets.dtype == jnp.int32
  # Runs past the M-th have no room (check_segments keeps such rows out).
  seqlens, offsets = attention.segment_layout(ids[2:3], 3)
  np.testing.assert_array_equal(seqlens, [[1, 1, 1]])
  np.testing.assert_array_equal(offsets, [[0, 1, 2, -1]])


def test_layout_rebuilds_the_dense_document_mask():
  rng = np.random.default_rng(0)
  P, B, T, M = 2, 6, 40, 8
  ids = _rows(rng, P * B, T, max_docs=M - 1).reshape(P, B, T)
  # Under jit and vmapped over a leading axis, as the pipeline's stages run it.
  seqlens, offsets = jax.jit(jax.vmap(lambda s: attention.segment_layout(s, M)))(ids)
  seqlens, offsets = np.asarray(seqlens), np.asarray(offsets)
  assert (offsets[..., -1] == -1).all()
  for p in range(P):
    for b in range(B):
      want = np.zeros((T, T), bool)
      for m in range(M):
        start, length = offsets[p, b, m], seqlens[p, b, m]
        assert (start < 0) == (length < 0)
        if length > 0:
          want[start : start + length, start : start + length] = np.tril(np.ones(length, bool))
      got = np.asarray(attention.document_mask(ids[p, b][None]))[0, 0] & np.tril(
        np.ones((T, T), bool)
      )
      np.testing.assert_array_equal(want, got, err_msg=f'row {p}, {b}: {ids[p, b]}')
      # Every token, padding included, is in exactly one segment.
      assert seqlens[p, b][seqlens[p, b] > 0].sum() == T


def test_check_segments_names_the_key_and_the_count():
  ids = np.array([[1, 1, 2, 3, 0], [1, 2, 2, 2, 2]], np.int32)
  attention.check_segments(ids, 4)  # Row 0 has exactly 4 runs: fits.
  with pytest.raises(ValueError, match=r'row 0 of the batch packs 4 documents') as e:
    attention.check_segments(ids, 3)
  assert 'model.max_segments=3' in str(e.value)
  assert 'at least 4' in str(e.value)


def _numpy_attention(q, k, v, ids):
  """Softmax attention with repeated kv heads and a per-token document + causal loop."""
  B, T, N, H = q.shape
  G = N // k.shape[2]
  k, v = k.repeat(G, axis=2), v.repeat(G, axis=2)
  out = np.zeros_like(q)
  for b in range(B):
    for t in range(T):
      keys = [s for s in range(t + 1) if ids[b, s] == ids[b, t]]
      for n in range(N):
        s = np.array([q[b, t, n] @ k[b, j, n] for j in keys]) / np.sqrt(H)
        p = np.exp(s - s.max())
        out[b, t, n] = (p / p.sum()) @ v[b, keys, n]
  return out


def _qkv(rng, B, T, N, K, H, dtype=np.float32):
  q = rng.normal(size=(B, T, N, H)).astype(dtype)
  k = rng.normal(size=(B, T, K, H)).astype(dtype)
  v = rng.normal(size=(B, T, K, H)).astype(dtype)
  return q, k, v


def test_xla_attend_equals_numpy_gqa_on_a_packed_row():
  rng = np.random.default_rng(1)
  ids = np.array([[1, 1, 1, 2, 2, 2, 2, 3, 3, 0, 0, 0]], np.int32)
  q, k, v = _qkv(rng, 1, 12, 4, 2, 8)
  out = attention.attend(q, k, v, ids, implementation='xla', max_segments=4)
  np.testing.assert_allclose(out, _numpy_attention(q, k, v, ids), rtol=1e-5, atol=1e-5)


def _fake_cudnn(
  query,
  key,
  value,
  q_seqlen=None,
  kv_seqlen=None,
  q_offsets=None,
  kv_offsets=None,
  *,
  scale,
  mask_type,
  qkv_layout,
):
  """jax's cuDNN attention as its docstring defines the packed layout, with a dense mask.

  Tokens outside every segment come out NaN, as cuDNN leaves them undefined;
  so do whole rows whose layout jax would misread.
  """
  B, T, N, H = query.shape
  assert qkv_layout == 'BTNH' and scale == pytest.approx(1 / np.sqrt(H))
  t = jnp.arange(T)
  if mask_type == MaskType.CAUSAL:
    assert q_seqlen is None and q_offsets is None
    in_BMT = jnp.ones((B, 1, T), bool)
  else:
    assert mask_type == MaskType.PADDING_CAUSAL
    M = q_seqlen.shape[1]
    assert q_offsets.shape == (B, M + 1) and q_seqlen.dtype == q_offsets.dtype == jnp.int32
    assert kv_seqlen is q_seqlen and kv_offsets is q_offsets
    if key.shape[2] != N:  # Offsets of GQA kv are safe only where jax scales them right.
      assert attention._kv_offsets_take_kv_stride()
    start, length = q_offsets[:, :M, None], q_seqlen[:, :, None]
    in_BMT = (start >= 0) & (length >= 0) & (t >= start) & (t < start + length)
    # jax concatenates the rows' non-negative entries: lengths and starts must
    # pair up, and a last offset column that is not -1 shifts every later row.
    valid_B = (q_offsets[:, M] == -1) & ((start >= 0) == (length >= 0)).all((1, 2))
    in_BMT &= valid_B[:, None, None]
  in_BMT = in_BMT.astype(jnp.float32)
  same_BTS = jnp.einsum('bmt,bms->bts', in_BMT, in_BMT) > 0
  mask_BTS = same_BTS & (t[:, None] >= t[None, :])
  out = jax.nn.dot_product_attention(query, key, value, mask=mask_BTS[:, None], scale=scale)
  covered_BT = in_BMT.sum(1) > 0
  return jnp.where(covered_BT[:, :, None, None], out, jnp.nan)


@pytest.mark.parametrize('gqa_offsets_fixed', [False, True])
@pytest.mark.parametrize('max_segments', [1, 6])
def test_cudnn_plumbing_equals_xla_under_vmap_jit_and_grad(
  monkeypatch, gqa_offsets_fixed, max_segments
):
  monkeypatch.setattr(attention.cudnn_attention, 'dot_product_attention', _fake_cudnn)
  monkeypatch.setattr(attention, '_kv_offsets_take_kv_stride', lambda: gqa_offsets_fixed)
  rng = np.random.default_rng(2)
  P, B, T, N, K, H = 2, 3, 16, 4, 2, 8
  if max_segments == 1:
    ids = np.ones((P, B, T), np.int32)
  else:
    ids = _rows(rng, P * B, T, max_docs=max_segments - 1).reshape(P, B, T)
  q, k, v = _qkv(rng, P * B, T, N, K, H)
  q, k, v = (x.reshape(P, B, *x.shape[1:]) for x in (q, k, v))
  g = rng.normal(size=q.shape).astype(np.float32)

  def loss(impl, q, k, v):
    attend = lambda q, k, v, s: attention.attend(  # noqa: E731
      q, k, v, s, implementation=impl, max_segments=max_segments
    )
    # vmapped over P, as the pipeline runs the layers, and remat as in training.
    out = jax.vmap(jax.checkpoint(attend))(q, k, v, ids)
    return (out * g).sum(), out

  results = {}
  for impl in ('xla', 'cudnn'):
    fn = jax.jit(jax.value_and_grad(lambda *a, impl=impl: loss(impl, *a), (0, 1, 2), True))
    results[impl] = fn(q, k, v)
  (_, out_xla), grads_xla = results['xla']
  (_, out_cudnn), grads_cudnn = results['cudnn']
  np.testing.assert_allclose(out_cudnn, out_xla, rtol=1e-5, atol=1e-5)
  for a, b in zip(grads_cudnn, grads_xla, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  # Unvmapped, and vmapped twice, it is the same function.
  flat = attention.attend(
    q[0], k[0], v[0], ids[0], implementation='cudnn', max_segments=max_segments
  )
  np.testing.assert_allclose(flat, out_xla[0], rtol=1e-5, atol=1e-5)
  twice = jax.vmap(
    jax.vmap(lambda *a: attention.attend(*a, implementation='cudnn', max_segments=max_segments))
  )(*(x[:, None] for x in (q, k, v, ids)))
  np.testing.assert_allclose(twice[:, 0], out_xla, rtol=1e-5, atol=1e-5)


def test_jax_cudnn_function_takes_the_layout_under_vmap_and_grad(monkeypatch):
  """The real jax function, traced (not run) on CPU with its device checks stubbed.

  jax's own vmap rule for it cannot batch packed lengths and offsets; the
  folding into B must reach it as plain [P * B, ...] arrays, forward and backward.
  """
  monkeypatch.setattr(attention.cudnn_attention, 'check_cudnn_version', lambda: 91000)
  monkeypatch.setattr(attention.cudnn_attention, 'check_compute_capability', lambda c: True)
  P, B, T, N, K, H, M = 2, 3, 64, 4, 2, 64, 6
  ids = np.ones((P, B, T), np.int32)
  ids[..., 20:], ids[..., 50:] = 2, 0
  q = jnp.zeros((P, B, T, N, H), jnp.bfloat16)
  k = v = jnp.zeros((P, B, T, K, H), jnp.bfloat16)

  def loss(q, k, v):
    attend = lambda q, k, v, s: attention.attend(  # noqa: E731
      q, k, v, s, implementation='cudnn', max_segments=M
    )
    return jax.vmap(jax.checkpoint(attend))(q, k, v, ids).astype(jnp.float32).sum()

  jaxpr = jax.make_jaxpr(jax.value_and_grad(loss, (0, 1, 2)))(q, k, v)
  assert [a.shape for a in jaxpr.out_avals] == [(), q.shape, k.shape, v.shape]
  text = str(jaxpr)
  kv_heads = K if attention._kv_offsets_take_kv_stride() else N
  # Rows folded to P * B, and cuDNN's softmax statistics for M segments per row.
  assert f'bf16[{P * B},{T},{N},{H}]' in text
  assert f'f32[{P * B * M},{N},{T}] = dot_product_attention_fwd_wrapper' in text
  assert 'dot_product_attention_bwd_wrapper' in text
  assert f'bf16[{P * B},{T},{kv_heads},{H}]' in text


def test_train_step_traces_cudnn_through_the_pipeline(monkeypatch, tiny_config):
  """The whole train step, two pipeline stages vmapped, reaches cuDNN with rows folded."""
  monkeypatch.setattr(attention.cudnn_attention, 'check_cudnn_version', lambda: 91000)
  monkeypatch.setattr(attention.cudnn_attention, 'check_compute_capability', lambda c: True)
  c = tiny_config
  c.model.update(attention='cudnn', dtype='bfloat16', max_segments=8, remat='full')
  c.mesh.update(data=2, tensor=2, pipeline=2)
  c.train.update(microbatches=2)
  config_lib.validate(c, 8)
  mesh = sharding.make_mesh(c.mesh)
  s = step_lib.setup(c, mesh)
  state = jax.eval_shape(s.init_state, jax.random.key(0))
  B, T = c.train.global_batch_size, c.train.seq_len
  spec = jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=sharding.batch_sharding(mesh))
  with jax.set_mesh(mesh):
    traced = s.train_step.trace(state, dict.fromkeys(('tokens', 'segment_ids', 'positions'), spec))
  text = str(traced.jaxpr)
  rows = 2 * B // 2  # Two stages x one micro-batch of B / 2 rows each.
  N, H = c.model.num_heads, c.model.d_model // c.model.num_heads
  assert f'bf16[{rows},{T},{N},{H}] = dot_product_attention_fwd_wrapper' in text
  assert 'dot_product_attention_bwd_wrapper' in text


def test_gqa_offsets_probe_reads_jax_helper(monkeypatch):
  fix = attention.cudnn_attention._fix_seqlen_offsets

  def fixed(q_seqlen, kv_seqlen, q_offsets, kv_offsets, query, key):
    # As jax-ml/jax#39521: kv offsets scaled by the keys' K * H, not the queries' N * H.
    q_seqlen, kv_seqlen, q_offsets, _ = fix(q_seqlen, kv_seqlen, q_offsets, kv_offsets, query, key)
    _, kv_offsets = fix(q_seqlen, kv_seqlen, kv_offsets, kv_offsets, key, key)[2:]
    return q_seqlen, kv_seqlen, q_offsets, kv_offsets

  def probe():
    attention._kv_offsets_take_kv_stride.cache_clear()
    return attention._kv_offsets_take_kv_stride()

  # This jax's own helper, read from its source: the query stride for both.
  buggy = 'kv_offsets = kv_offsets * N * H' in inspect.getsource(fix)
  try:
    assert probe() is not buggy
    monkeypatch.setattr(attention.cudnn_attention, '_fix_seqlen_offsets', fixed)
    assert probe() is True
    monkeypatch.delattr(attention.cudnn_attention, '_fix_seqlen_offsets')
    assert probe() is False
  finally:
    monkeypatch.undo()
    attention._kv_offsets_take_kv_stride.cache_clear()


def test_cudnn_without_a_gpu_names_the_key():
  if jax.default_backend() == 'gpu':
    pytest.skip('a GPU is present')
  q, k, v = _qkv(np.random.default_rng(3), 1, 8, 2, 1, 8, jnp.bfloat16)
  ids = np.array([[1, 1, 1, 2, 2, 0, 0, 0]], np.int32)
  with pytest.raises(RuntimeError, match=r"model.attention='cudnn' cannot run here"):
    attention.attend(q, k, v, ids, implementation='cudnn', max_segments=4)


@pytest.mark.parametrize(
  'overrides,message',
  [
    ({'max_segments': 0}, 'model.max_segments: must be > 0, got 0'),
    (
      {'attention': 'cudnn', 'dtype': 'bfloat16', 'max_segments': 33},
      'model.max_segments=33 exceeds train.seq_len=32',
    ),
    ({'attention': 'cudnn', 'max_segments': 8}, "model.attention='cudnn' needs model.dtype"),
  ],
)
def test_config_rejects_max_segments(tiny_config, overrides, message):
  tiny_config.model.update(overrides)
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(tiny_config, 1)
  assert message in str(e.value)


def test_config_accepts_max_segments_at_seq_len(tiny_config):
  tiny_config.model.update(attention='cudnn', dtype='bfloat16', max_segments=32)
  config_lib.validate(tiny_config, 1)
  tiny_config.model.update(attention='xla', dtype='float32', max_segments=1000)
  config_lib.validate(tiny_config, 1)  # 'xla' ignores it.


def test_saved_config_without_max_segments_loads(tiny_config):
  d = tiny_config.model.to_dict()
  del d['max_segments']
  assert config_lib.ModelConfig.from_config(ml_collections.ConfigDict(d)).max_segments == 64
  del d['d_model']
  with pytest.raises(KeyError):
    config_lib.ModelConfig.from_config(ml_collections.ConfigDict(d))


def _gpu():
  try:
    return bool(jax.devices('gpu'))
  except RuntimeError:
    return False


@pytest.mark.skipif(not _gpu(), reason='cuDNN attention needs a GPU')
def test_cudnn_equals_xla_on_gpu():
  """Run with JAX_PLATFORMS=cuda,cpu: tests/conftest.py defaults to CPU."""
  rng = np.random.default_rng(4)
  P, B, T, N, K, H, M = 1, 2, 512, 8, 2, 128, 8
  ids = _rows(rng, P * B, T, max_docs=M - 1).reshape(P, B, T)
  ids[0, 0, -37:] = 0  # A padding tail for sure.
  q, k, v = (
    jnp.asarray(x.reshape(P, B, *x.shape[1:]), jnp.bfloat16) for x in _qkv(rng, P * B, T, N, K, H)
  )
  g = jnp.asarray(rng.normal(size=q.shape), jnp.bfloat16)

  def loss(impl, q, k, v):
    out = jax.vmap(
      lambda q, k, v, s: attention.attend(q, k, v, s, implementation=impl, max_segments=M)
    )(q, k, v, ids)
    return (out.astype(jnp.float32) * g).sum(), out

  results = {}
  for impl in ('xla', 'cudnn'):
    fn = jax.jit(jax.value_and_grad(lambda *a, impl=impl: loss(impl, *a), (0, 1, 2), True))
    results[impl] = fn(q, k, v)
  (_, out_xla), grads_xla = results['xla']
  (_, out_cudnn), grads_cudnn = results['cudnn']
  f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
  np.testing.assert_allclose(f32(out_cudnn), f32(out_xla), rtol=2e-2, atol=2e-2)
  for a, b in zip(grads_cudnn, grads_xla, strict=True):
    scale = np.abs(f32(b)).max()
    np.testing.assert_allclose(f32(a), f32(b), rtol=5e-2, atol=2e-2 * scale)
