"""cuDNN packed attention against XLA's on CodeLlama-34B-shaped rows, on a GPU.

Builds packed rows (T 8192, 64 query / 8 kv heads of 128, bf16; a few
documents per row and a padding tail on the last row), runs
`clm_jax.model.attention.attend` with 'xla' and 'cudnn' under jit, and prints the
largest absolute and relative (to the largest XLA value) differences of the
output and of the gradients of q, k and v, then the median time of each
implementation's forward and forward + backward. The cuDNN path also runs
vmapped over a leading axis, as the pipeline's stages run it, and must agree
with itself. Exits 1 if a difference is beyond bf16 tolerances; on a machine
without a GPU it says so and exits 0.

XLA's reference materialises [B, K, G, T, S] float32 scores (17 GB at the
default shape and one row): lower --seq_len if it runs out of memory.

  python benchmarks/attention_check.py [--batch=1] [--seq_len=8192] [--docs=4]
"""

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags

from clm_jax.model import attention

_BATCH = flags.DEFINE_integer('batch', 1, 'Rows.')
_SEQ_LEN = flags.DEFINE_integer('seq_len', 8192, 'Tokens per row (T).')
_HEADS = flags.DEFINE_integer('num_heads', 64, 'Query heads (N).')
_KV_HEADS = flags.DEFINE_integer('num_kv_heads', 8, 'Key/value heads (K).')
_HEAD_DIM = flags.DEFINE_integer('head_dim', 128, 'H.')
_DOCS = flags.DEFINE_integer('docs', 4, 'Documents per row.')
_MAX_SEGMENTS = flags.DEFINE_integer('max_segments', 64, 'model.max_segments.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed calls of each function (after one).')

# bf16 inputs: outputs within 2% and gradients within 5% of the largest value.
TOLERANCE = {'out': 2e-2, 'dq': 5e-2, 'dk': 5e-2, 'dv': 5e-2}


def packed_rows(rng, batch, seq_len, docs):
  """[B, T] segment ids: `docs` documents of random lengths; the last row ends in padding."""
  ids = np.zeros((batch, seq_len), np.int32)
  for b in range(batch):
    end = seq_len - seq_len // 32 if b == batch - 1 else seq_len
    bounds = [0, *np.sort(rng.choice(np.arange(1, end), docs - 1, replace=False)), end]
    for d in range(docs):
      ids[b, bounds[d] : bounds[d + 1]] = d + 1
  return ids


def median_seconds(fn, *args):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(_REPEATS.value):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def main(argv):
  del argv
  if jax.default_backend() != 'gpu':
    print(f'no GPU (backend {jax.default_backend()}): nothing to compare')
    return 0
  B, T, N, K, H = (f.value for f in (_BATCH, _SEQ_LEN, _HEADS, _KV_HEADS, _HEAD_DIM))
  rng = np.random.default_rng(0)
  ids = jnp.asarray(packed_rows(rng, B, T, _DOCS.value))
  attention.check_segments(np.asarray(ids), _MAX_SEGMENTS.value)
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (B, T, N, H), jnp.bfloat16)
  k = jax.random.normal(keys[1], (B, T, K, H), jnp.bfloat16)
  v = jax.random.normal(keys[2], (B, T, K, H), jnp.bfloat16)
  g = jax.random.normal(keys[3], (B, T, N, H), jnp.bfloat16)

  def attend(impl, q, k, v, ids):
    return attention.attend(q, k, v, ids, implementation=impl, max_segments=_MAX_SEGMENTS.value)

  results, times = {}, {}
  for impl in ('xla', 'cudnn'):
    forward = jax.jit(lambda q, k, v, impl=impl: attend(impl, q, k, v, ids))

    def loss(q, k, v, impl=impl):
      return (attend(impl, q, k, v, ids).astype(jnp.float32) * g).sum()

    backward = jax.jit(jax.grad(loss, (0, 1, 2)))
    dq, dk, dv = backward(q, k, v)
    results[impl] = {'out': forward(q, k, v), 'dq': dq, 'dk': dk, 'dv': dv}
    times[impl] = (median_seconds(forward, q, k, v), median_seconds(backward, q, k, v))
  vmapped = jax.jit(jax.vmap(lambda *a: attend('cudnn', *a)))(q[None], k[None], v[None], ids[None])

  ok = True
  print(f'B {B}, T {T}, heads {N}/{K} of {H}, bf16, {_DOCS.value} documents per row')
  for name, tolerance in TOLERANCE.items():
    a = np.asarray(results['cudnn'][name], np.float32)
    b = np.asarray(results['xla'][name], np.float32)
    err, scale = np.abs(a - b).max(), np.abs(b).max()
    good = err <= tolerance * scale
    ok &= good
    print(f'{name}: max |cudnn - xla| {err:.4g}, relative {err / scale:.4g}', '' if good else 'BAD')
  a = np.asarray(vmapped[0], np.float32)
  b = np.asarray(results['cudnn']['out'], np.float32)
  err = np.abs(a - b).max()
  ok &= err <= 1e-3 * np.abs(b).max()
  print(f'cudnn vmapped vs cudnn: max difference {err:.4g}')
  for impl, (fwd, both) in times.items():
    print(f'{impl}: forward {fwd * 1e3:.2f} ms, forward + backward {both * 1e3:.2f} ms')
  print('OK' if ok else 'MISMATCH')
  return 0 if ok else 1


if __name__ == '__main__':
  app.run(main)  # Exits with main's status.
