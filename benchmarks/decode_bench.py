"""Decode throughput of clm_jax.inference.generate on configs/bench_tiny.py's model (random init).

For each batch size, times generate() with `--new_tokens` greedy tokens and
with one (the prefill and a first sample), median of `--repeats` runs each
after a compiling warm-up, and prints a Markdown table: end-to-end tokens/s,
and the decode loop alone, (time(N) - time(1)) / (N - 1) per step.

  python benchmarks/decode_bench.py [--batch_sizes=1,8] [--prompt_len=128] [--new_tokens=64]
"""

import statistics
import time

import jax
import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

from clm_jax import config as config_lib
from clm_jax.inference import generate
from clm_jax.model import decoder as model_lib

config_flags.DEFINE_config_file('config', 'configs/bench_tiny.py', 'Config whose model to time.')
_BATCH_SIZES = flags.DEFINE_list('batch_sizes', ['1', '8'], 'Rows per generate() call.')
_PROMPT_LEN = flags.DEFINE_integer('prompt_len', 128, 'Prompt tokens per row.')
_NEW_TOKENS = flags.DEFINE_integer('new_tokens', 64, 'Generated tokens per row (no stop ids).')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed runs per setting; the median is kept.')


def _median_seconds(fn, repeats: int) -> float:
  fn()  # Compiles.
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()  # generate() returns host lists, so the work is done when it returns.
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main(argv):
  del argv
  cfg = config_lib.ModelConfig.from_config(flags.FLAGS.config.model)
  params = jax.jit(model_lib.init, static_argnums=0)(cfg, jax.random.key(0))
  rng = np.random.default_rng(0)
  n = _NEW_TOKENS.value
  print(
    f'd_model {cfg.d_model}, {cfg.num_layers} layers, {cfg.num_heads} heads / '
    f'{cfg.num_kv_heads} kv heads, vocab {cfg.vocab_size}, {cfg.dtype}; '
    f'{model_lib.param_count(params) / 1e6:.1f}M params; prompt {_PROMPT_LEN.value}, '
    f'{n} new tokens, greedy; median of {_REPEATS.value}; {jax.devices()[0].device_kind}\n'
  )
  print(
    f'| batch | prefill + 1 token | prefill + {n} tokens | tokens/s (end to end) '
    '| decode ms/step | decode tokens/s |'
  )
  print('|---|---|---|---|---|---|')
  for batch_size in map(int, _BATCH_SIZES.value):
    prompts = rng.integers(0, cfg.vocab_size, (batch_size, _PROMPT_LEN.value))

    def run(new_tokens, prompts=prompts):
      return generate.generate(cfg, params, prompts, max_new_tokens=new_tokens)

    first = _median_seconds(lambda: run(1), _REPEATS.value)
    total = _median_seconds(lambda: run(n), _REPEATS.value)
    per_step = (total - first) / (n - 1)
    print(
      f'| {batch_size} | {first * 1e3:.0f} ms | {total * 1e3:.0f} ms | '
      f'{batch_size * n / total:,.0f} | {per_step * 1e3:.1f} | {batch_size / per_step:,.0f} |'
    )


if __name__ == '__main__':
  app.run(main)
