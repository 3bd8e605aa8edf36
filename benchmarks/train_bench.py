"""Training throughput of configs/bench_tiny.py against this machine's own matmul peak.

Prints the steady-state step time (median), tokens/s, achieved model
TFLOP/s, a plain jitted fp32 matmul's TFLOP/s measured in the same process,
and their ratio (CPU-MFU); then the compile time of the train step at 4 and
48 layers, to show that the layer scan keeps compile time flat in depth.

  python benchmarks/train_bench.py [--steps=8] [--config.model.remat=full ...]
"""

import statistics
import sys
import time

import jax
import jax.numpy as jnp
from absl import app
from absl import flags
from ml_collections import config_flags

from clm_jax import config as config_lib
from clm_jax.data import loader
from clm_jax.data import tokenizer as tokenizer_lib
from clm_jax.model import flops
from clm_jax.parallel import sharding
from clm_jax.plan import xla_memory
from clm_jax.train import step as step_lib

config_flags.DEFINE_config_file('config', 'configs/bench_tiny.py', 'Config to benchmark.')
_STEPS = flags.DEFINE_integer('steps', 8, 'Timed steps (after 2 warm-up steps).')
_MATMUL = flags.DEFINE_integer('matmul', 2048, 'Side of the square fp32 matmul peak probe.')
_DEPTHS = flags.DEFINE_list('compile_layers', ['4', '48'], 'Depths to time compilation at.')


def _median_time(fn, repeats):
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def matmul_tflops(n: int) -> float:
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  f = jax.jit(jnp.matmul)
  f(a, b).block_until_ready()
  return 2 * n**3 / _median_time(lambda: f(a, b), 10) / 1e12


def compile_seconds(c, num_layers: int) -> float:
  """Lowers and compiles the train step on abstract arrays only."""
  c = c.copy_and_resolve_references()
  c.model.num_layers = num_layers
  return xla_memory.compile_step(c, sharding.make_mesh(c.mesh))[2]


def main(argv):
  del argv
  c = flags.FLAGS.config
  config_lib.validate(c, jax.device_count())
  mesh = sharding.make_mesh(c.mesh)
  s = step_lib.setup(c, mesh)
  tok = tokenizer_lib.for_corpus(c.data, c.model.vocab_size)
  it = iter(
    loader.make_dataset(
      c.data,
      tok,
      seq_len=c.train.seq_len,
      batch_size=c.train.global_batch_size,
      split='train',
      seed=c.train.seed,
    )
  )
  tokens_per_step = c.train.global_batch_size * c.train.seq_len
  model_flops = flops.train_flops_per_token(s.model_cfg, c.train.seq_len) * tokens_per_step

  with jax.set_mesh(mesh):
    state = s.init_state(jax.random.key(0))
    times = []
    for i in range(2 + _STEPS.value):
      batch = sharding.host_to_global(next(it), mesh)
      t = time.perf_counter()
      state, metrics = s.train_step(state, batch)
      jax.block_until_ready(metrics)
      if i >= 2:
        times.append(time.perf_counter() - t)
  it.close()
  step = statistics.median(times)
  achieved = model_flops / step / jax.device_count() / 1e12
  peak = matmul_tflops(_MATMUL.value)
  print(f'device: {jax.devices()[0].device_kind} x {jax.device_count()}')
  print(f'step time (median of {len(times)}): {step:.3f} s')
  print(f'tokens/s: {tokens_per_step / step:,.0f}')
  print(f'model TFLOP/s per device: {achieved:.4f}')
  print(f'fp32 matmul {_MATMUL.value}^2 TFLOP/s: {peak:.4f}')
  print(f'CPU-MFU (model / matmul): {achieved / peak:.3f}')
  print(f'final loss: {float(metrics["loss"]):.4f}')
  for depth in _DEPTHS.value:
    print(f'compile train step, {depth} layers: {compile_seconds(c, int(depth)):.1f} s')
  sys.stdout.flush()


if __name__ == '__main__':
  app.run(main)
