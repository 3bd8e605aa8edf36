"""benchmarks/gpu_proxy.py on CPU with a tiny shape: its numbers against a hand computation."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SHAPE = dict(d_model=64, num_heads=4, num_kv_heads=2, mlp_dim=128, vocab=256, seq_len=64)


@pytest.fixture(scope='module')
def proxy(tmp_path_factory):
  """Runs the proxy and returns its JSON; the runs share a compilation cache."""
  cache = tmp_path_factory.mktemp('jax_cache')
  env = {
    **os.environ,
    'JAX_PLATFORMS': 'cpu',
    'JAX_COMPILATION_CACHE_DIR': str(cache),
    'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
    'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0',
  }

  def run(**flags):
    flags = {**SHAPE, 'steps': 3, 'warmup': 1, 'peak_tflops': 1, **flags}
    args = [f'--{k}={v}' for k, v in flags.items()]
    out = subprocess.run(
      [sys.executable, 'benchmarks/gpu_proxy.py', '--json', *args],
      capture_output=True,
      text=True,
      cwd=ROOT,
      env=env,
      timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])

  return run


@pytest.fixture(scope='module')
def two_layers(proxy):
  return proxy(layers=2, batch=2, microbatches=2)


def test_mfu_and_throughput_follow_from_the_step_times(two_layers):
  r = two_layers
  D, N, K, F, V, T = (
    SHAPE[k] for k in ('d_model', 'num_heads', 'num_kv_heads', 'mlp_dim', 'vocab', 'seq_len')
  )
  H, L = D // N, 2
  # Megatron-LM: 6 FLOPs per matmul weight per token, plus QK^T and PV over
  # half the T x T square (causal), forward and backward.
  flops_per_token = 6 * (L * (D * H * (2 * N + 2 * K) + 3 * D * F) + D * V) + 6 * L * T * N * H
  assert r['layers'] == 2 and r['layers_auto'] is None
  assert r['flops_per_token'] == flops_per_token
  assert r['config']['batch'] == 2 and r['config']['microbatches'] == 2
  assert r['config']['attention'] == 'xla'  # The CPU default.
  times = r['step_times_s']
  assert len(times) == 3 and all(t > 0 for t in times)
  assert r['median_step_s'] == sorted(times)[1]
  assert r['tokens_per_s'] == pytest.approx(2 * T / r['median_step_s'], rel=1e-12)
  assert r['model_tflops_per_device'] == pytest.approx(
    flops_per_token * r['tokens_per_s'] / 1e12, rel=1e-12
  )
  assert r['peak_tflops'] == 1
  assert r['mfu'] == pytest.approx(flops_per_token * r['tokens_per_s'] / 1e12, rel=1e-12)
  # Params: embedding, LM head, final norm, and per layer q/k/v/o, MLP and two norms.
  per_layer = D * H * (2 * N + 2 * K) + 3 * D * F + 2 * D
  assert r['param_count'] == 2 * V * D + D + L * per_layer
  mem = r['memory']
  assert mem['total'] == (mem['arguments'] + mem['outputs'] - mem['aliased'] + mem['temporaries'])
  # fp32 params and two Adam moments are arguments, donated and aliased.
  assert mem['aliased'] >= 3 * 4 * r['param_count']
  assert 0 < r['final_loss'] < 10


def test_auto_layers_follow_the_memory_budget(proxy, two_layers):
  need_two = two_layers['memory']['total']
  # One byte short of two layers' step: one layer.
  small = proxy(layers='auto', batch=2, microbatches=2, memory_gb=(need_two - 1) / 1e9)
  auto = small['layers_auto']
  assert small['layers'] == 1
  assert auto['total_bytes']['2'] == need_two > auto['budget_bytes'] >= auto['total_bytes']['1']
  assert small['memory']['total'] == auto['total_bytes']['1']
  # Plenty: the ceiling, reached through the linear fit and checked by compiling it.
  large = proxy(layers='auto', batch=2, microbatches=2, memory_gb=100, max_layers=3)
  assert large['layers'] == 3
  assert set(large['layers_auto']['total_bytes']) == {'1', '2', '3'}
  assert large['memory']['total'] == large['layers_auto']['total_bytes']['3'] <= 100e9
