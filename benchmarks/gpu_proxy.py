"""MFU of the real train step on CodeLlama-34B's layer shape, on one device.

One GPU cannot hold the 48-layer model with its fp32 master weights and AdamW
state, but every layer is the same: this runs `clm_jax.train`'s jitted step
(configs/codellama_34b.py: d_model 8192, 64 query / 8 kv heads, SwiGLU 22016,
vocab 32000, 8192-token rows, bf16 compute, full remat) with as many layers as
fit, on synthetic packed rows (a few documents each, a padding tail on the
last row), and reports model FLOPs utilisation: Megatron-LM's count of
`clm_jax.model.flops.train_flops_per_token` (causal attention counted once) over the
device's dense bf16 peak (`clm_jax.model.flops.peak_tflops`; 989 TFLOP/s for H100).

--layers=auto compiles the step on abstract inputs at 1 and 2 layers, fits
memory = a + b * layers to XLA's memory analysis (arguments + outputs not
aliased to them + temporaries), and takes the most layers under the budget,
checked by compiling that count; that compilation is the one that runs.

  python benchmarks/gpu_proxy.py                    # the 34B shape, auto layers, cuDNN
  python benchmarks/gpu_proxy.py --layers=8 --batch=2 --microbatches=2 --json
  python benchmarks/gpu_proxy.py --attention=xla --remat=save_dots --steps=5
"""

import json
import math
import os
import statistics
import sys
import time

import jax
import numpy as np
from absl import app
from absl import flags

from clm_jax import config as config_lib
from clm_jax.model import attention as attention_lib
from clm_jax.model import flops
from clm_jax.parallel import gpu_env
from clm_jax.parallel import sharding
from clm_jax.plan import xla_memory
from configs import codellama_34b

_LAYERS = flags.DEFINE_string(
  'layers', 'auto', "Decoder layers, or 'auto': the most whose train step fits in memory."
)
_MAX_LAYERS = flags.DEFINE_integer('max_layers', 48, "--layers=auto's ceiling (the 34B has 48).")
_MEMORY_GB = flags.DEFINE_float(
  'memory_gb', 0.0, "--layers=auto's budget in GB (1e9 bytes); 0 = the device's bytes_limit."
)
_BATCH = flags.DEFINE_integer('batch', 1, 'Rows per step (train.global_batch_size).')
_MICROBATCHES = flags.DEFINE_integer('microbatches', 1, 'Gradient-accumulation splits.')
_REMAT = flags.DEFINE_enum('remat', 'full', ['none', 'full', 'save_dots'], 'model.remat.')
_ATTENTION = flags.DEFINE_enum(
  'attention', None, ['xla', 'cudnn'], 'model.attention; default cudnn on GPUs, else xla.'
)
_DOCS = flags.DEFINE_integer('docs', 4, 'Documents packed into each row.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps first.')
_PEAK = flags.DEFINE_float('peak_tflops', 0.0, 'Device bf16 peak; 0 = look up the device kind.')
_GPU_DEFAULTS = flags.DEFINE_bool(
  'gpu_defaults', True, "On GPUs, training's XLA defaults (clm_jax/parallel/gpu_env.py)."
)
_JSON = flags.DEFINE_bool('json', False, 'Print one JSON object instead of lines.')
_D_MODEL = flags.DEFINE_integer('d_model', 8192, 'model.d_model.')
_NUM_HEADS = flags.DEFINE_integer('num_heads', 64, 'model.num_heads.')
_NUM_KV_HEADS = flags.DEFINE_integer('num_kv_heads', 8, 'model.num_kv_heads.')
_MLP_DIM = flags.DEFINE_integer('mlp_dim', 22016, 'model.mlp_dim.')
_VOCAB = flags.DEFINE_integer('vocab', 32000, 'model.vocab_size.')
_SEQ_LEN = flags.DEFINE_integer('seq_len', 8192, 'train.seq_len.')


def make_config(num_layers: int, attention: str):
  """configs/codellama_34b.py on one device, with this run's shape and step."""
  c = codellama_34b.get_config()
  seq_len = _SEQ_LEN.value
  c.model.update(
    num_layers=num_layers,
    d_model=_D_MODEL.value,
    num_heads=_NUM_HEADS.value,
    num_kv_heads=_NUM_KV_HEADS.value,
    mlp_dim=_MLP_DIM.value,
    vocab_size=_VOCAB.value,
    max_seq_len=max(c.model.max_seq_len, seq_len),
    remat=_REMAT.value,
    attention=attention,
  )
  c.mesh.update(data=1, tensor=1, pipeline=1, virtual_stages=1, pipeline_microbatches=0)
  c.train.update(
    seq_len=seq_len,
    global_batch_size=_BATCH.value,
    microbatches=_MICROBATCHES.value,
    # The training default (512) where it divides the row, as validation wants.
    loss_chunk_len=math.gcd(512, seq_len),
  )
  return c


def synthetic_batch(rng, batch: int, seq_len: int, docs: int, vocab: int) -> dict:
  """[B, T] rows of `docs` documents of random lengths; the last row ends in padding."""
  segment_ids = np.zeros((batch, seq_len), np.int32)
  positions = np.zeros((batch, seq_len), np.int32)
  for b in range(batch):
    end = seq_len - seq_len // 32 if b == batch - 1 else seq_len
    cuts = np.sort(rng.choice(np.arange(1, end), docs - 1, replace=False))
    bounds = [0, *cuts, end]
    for d in range(docs):
      lo, hi = bounds[d], bounds[d + 1]
      segment_ids[b, lo:hi] = d + 1
      positions[b, lo:hi] = np.arange(hi - lo)
  tokens = np.where(segment_ids > 0, rng.integers(1, vocab, (batch, seq_len)), 0)
  return {'tokens': tokens.astype(np.int32), 'segment_ids': segment_ids, 'positions': positions}


def compile_step(num_layers: int, attention: str, device):
  """(setup, compiled train step, seconds to compile) on abstract state and batch."""
  c = make_config(num_layers, attention)
  config_lib.validate(c, 1)
  return xla_memory.compile_step(c, sharding.make_mesh(c.mesh, devices=[device]))


def choose_layers(budget: int, max_layers: int, attention: str, device):
  """The most layers (<= max_layers) whose step fits `budget` bytes, and what was compiled.

  Returns:
    (layers, {layers: (setup, compiled, compile seconds)}, {layers: total bytes}).
  """
  built, totals = {}, {}

  def total(n):
    if n not in built:
      built[n] = compile_step(n, attention, device)
      totals[n] = xla_memory.figures(built[n][1])['total']
    return totals[n]

  if total(1) > budget:
    raise SystemExit(
      f'one layer needs {total(1) / 1e9:.2f} GB, over the {budget / 1e9:.2f} GB budget: '
      'lower --batch or raise --microbatches'
    )
  if max_layers == 1 or total(2) > budget:
    return 1, built, totals
  per_layer = total(2) - total(1)
  n = max_layers if per_layer <= 0 else min(max_layers, 1 + (budget - total(1)) // per_layer)
  # Memory is linear in depth (the layers are one scan); the check catches
  # what the fit misses, stepping down until the compiled step fits.
  while n > 2 and total(n) > budget:
    n -= 1
  return n, built, totals


def main(argv):
  del argv
  if _GPU_DEFAULTS.value and gpu_env.gpu_present():
    gpu_env.apply(os.environ)  # Before the backend starts: XLA reads its flags then.
  if _STEPS.value < 1 or _WARMUP.value < 0:
    raise app.UsageError('--steps must be >= 1 and --warmup >= 0')
  device = jax.devices()[0]
  on_gpu = device.platform == 'gpu'
  attention = _ATTENTION.value or ('cudnn' if on_gpu else 'xla')
  stats = device.memory_stats() or {}

  auto = None
  if _LAYERS.value == 'auto':
    budget = int(_MEMORY_GB.value * 1e9) or stats.get('bytes_limit', 0)
    if not budget:
      raise app.UsageError(f'{device.platform} reports no memory limit: pass --memory_gb')
    layers, built, totals = choose_layers(budget, _MAX_LAYERS.value, attention, device)
    auto = {'budget_bytes': budget, 'max_layers': _MAX_LAYERS.value, 'total_bytes': totals}
    s, compiled, compile_s = built[layers]
    del built
  else:
    layers = int(_LAYERS.value)
    s, compiled, compile_s = compile_step(layers, attention, device)

  c = make_config(layers, attention)
  B, T = c.train.global_batch_size, c.train.seq_len
  host_batch = synthetic_batch(np.random.default_rng(0), B, T, _DOCS.value, c.model.vocab_size)
  if attention == 'cudnn':
    attention_lib.check_segments(host_batch['segment_ids'], c.model.max_segments)
  batch = sharding.host_to_global(host_batch, s.mesh)
  with jax.set_mesh(s.mesh):
    state = s.init_state(jax.random.key(0))
    times = []
    for i in range(_WARMUP.value + _STEPS.value):
      t = time.perf_counter()
      state, metrics = compiled(state, batch)
      jax.block_until_ready((state, metrics))
      if i >= _WARMUP.value:
        times.append(time.perf_counter() - t)

  step = statistics.median(times)
  tokens = B * T
  flops_per_token = flops.train_flops_per_token(s.model_cfg, T)
  achieved = flops_per_token * tokens / step / 1e12  # One device.
  peak = flops.peak_tflops(device, _PEAK.value)
  stats = device.memory_stats() or {}
  result = {
    'device_kind': device.device_kind,
    'platform': device.platform,
    'config': {
      'd_model': c.model.d_model,
      'num_heads': c.model.num_heads,
      'num_kv_heads': c.model.num_kv_heads,
      'mlp_dim': c.model.mlp_dim,
      'vocab': c.model.vocab_size,
      'seq_len': T,
      'batch': B,
      'microbatches': c.train.microbatches,
      'remat': c.model.remat,
      'attention': attention,
      'max_segments': c.model.max_segments,
      'docs_per_row': _DOCS.value,
      'dtype': c.model.dtype,
      'param_dtype': c.model.param_dtype,
      'loss_chunk_len': c.train.loss_chunk_len,
    },
    'layers': layers,
    'layers_auto': auto,
    'param_count': s.param_count,
    'compile_s': compile_s,
    'step_times_s': times,
    'median_step_s': step,
    'tokens_per_step': tokens,
    'tokens_per_s': tokens / step,
    'flops_per_token': flops_per_token,
    'model_tflops_per_device': achieved,
    'peak_tflops': peak,
    'mfu': achieved / peak if peak else None,
    'final_loss': float(metrics['loss']),
    'memory': {
      **xla_memory.figures(compiled),
      'device_bytes_limit': stats.get('bytes_limit'),
      'device_peak_bytes_in_use': stats.get('peak_bytes_in_use'),
    },
  }
  if _JSON.value:
    print(json.dumps(result))
  else:
    gb = result['memory']['total'] / 1e9
    mfu = f'{result["mfu"]:.3f}' if peak else 'n/a (unknown peak: pass --peak_tflops)'
    print(f'device: {device.device_kind}; attention {attention}, remat {c.model.remat}')
    print(f'layers: {layers} ({s.param_count:,} parameters), XLA memory {gb:.2f} GB')
    print(f'rows x tokens per step: {B} x {T} in {c.train.microbatches} micro-batches')
    print(f'step time (median of {len(times)}): {step:.3f} s; compile {compile_s:.1f} s')
    print(f'tokens/s: {tokens / step:,.0f}')
    print(f'model TFLOP/s per device: {achieved:.1f}; MFU {mfu}')
    print(f'final loss: {result["final_loss"]:.4f}')
  sys.stdout.flush()


if __name__ == '__main__':
  app.run(main)
