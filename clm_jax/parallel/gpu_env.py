"""XLA flags and environment defaults for training on NVIDIA GPUs (A100, H100).

From NVIDIA's JAX-Toolbox guide and its MaxText / AXLearn recipes, so that
communication overlaps compute. `apply` runs before jax is imported (XLA reads
XLA_FLAGS once) and never overrides a flag or variable the user set.

Left out on purpose: flags already at the recipes' values, or gone from this
jaxlib (which would abort: xla_gpu_enable_async_collectives, xla_gpu_graph_level,
xla_gpu_enable_triton_softmax_fusion, xla_gpu_enable_pipelined_collectives);
recipe choices trading safety for one model's speed (disabling rematerialization:
an OOM instead of a slower step; command buffers off; triton_gemm off;
experimental pipelined_p2p); and NCCL_NVLS_ENABLE, which NCCL sets right itself.
"""

import glob
import importlib.util
import os
from collections.abc import MutableMapping

# 1 GiB: what JAX-Toolbox's MaxText and AXLearn recipes use for all-reduce and
# all-gather. Its guide asks for at least one layer's weights (all-gather) or
# gradients (reduce-scatter); a CodeLlama-7B layer is ~0.4 GB in bf16.
_COMBINE_BYTES = str(1 << 30)

XLA_GPU_FLAGS: dict[str, str] = {
  # Schedule collectives asynchronously, overlapping independent compute; off
  # by default, and the flag that matters most for multi-GPU step time.
  'xla_gpu_enable_latency_hiding_scheduler': 'true',
  # Collectives on a high-priority stream, so they are not starved by the
  # compute they overlap. XLA's default today; pinned, as the overlap relies on it.
  'xla_gpu_enable_highest_priority_async_stream': 'true',
  # Merge gradient all-reduces (data parallelism) and tensor-parallel
  # all-gathers / reduce-scatters into large transfers: bandwidth-bound
  # instead of latency-bound. XLA's default is 30 MiB.
  'xla_gpu_all_reduce_combine_threshold_bytes': _COMBINE_BYTES,
  'xla_gpu_all_gather_combine_threshold_bytes': _COMBINE_BYTES,
  'xla_gpu_reduce_scatter_combine_threshold_bytes': _COMBINE_BYTES,
  # Start a loop iteration's collectives in the previous iteration, so layer
  # i+1's communication overlaps layer i's compute inside the layer scan.
  # Reduce-scatter is XLA's default already; pinned with the other two.
  'xla_gpu_enable_pipelined_all_gather': 'true',
  'xla_gpu_enable_pipelined_reduce_scatter': 'true',
  'xla_gpu_enable_pipelined_all_reduce': 'true',
  # Unroll the layer scan by two with separate buffers, which is what gives the
  # pipelined collectives above room to overlap.
  'xla_gpu_enable_while_loop_double_buffering': 'true',
}

ENV_DEFAULTS: dict[str, str] = {
  # JAX reserves 75% of each GPU by default; 90% leaves room for NCCL and cuDNN
  # workspaces outside XLA's pool, as JAX-Toolbox recommends.
  'XLA_PYTHON_CLIENT_MEM_FRACTION': '0.9',
  # One hardware queue per GPU, so a collective the scheduler launched before a
  # compute kernel also starts first and gets its SMs (JAX-Toolbox, for Hopper
  # with the latency-hiding scheduler; Megatron sets it for the same reason).
  # On Blackwell this is slower: export CUDA_DEVICE_MAX_CONNECTIONS=8 there.
  'CUDA_DEVICE_MAX_CONNECTIONS': '1',
}

# Where the NVIDIA driver lists GPUs and device nodes; module-level for tests.
_PROC_GPUS = '/proc/driver/nvidia/gpus'
_DEV = '/dev'
_CUDA_PLUGINS = ('jax_cuda13_plugin', 'jax_cuda12_plugin')


def _flag_name(token: str) -> str:
  return token.lstrip('-').split('=', 1)[0]


def apply(environ: MutableMapping[str, str]) -> dict[str, str]:
  """Adds the GPU defaults to `environ` wherever the user has not set them.

  Call it before importing jax. Returns what was added, `'--<flag>'` or the
  variable name mapped to its value.
  """
  user_flags = environ.get('XLA_FLAGS', '')
  present = {_flag_name(token) for token in user_flags.split()}
  changed = {}
  added = []
  for name, value in XLA_GPU_FLAGS.items():
    if name not in present:
      added.append(f'--{name}={value}')
      changed[f'--{name}'] = value
  if added:
    environ['XLA_FLAGS'] = ' '.join([*user_flags.split(), *added])
  for name, value in ENV_DEFAULTS.items():
    if name not in environ:
      environ[name] = value
      changed[name] = value
  return changed


def gpu_present() -> bool:
  """Whether this process will run on an NVIDIA GPU, decided without importing jax.

  Visible GPUs plus an installed JAX CUDA plugin count too: containers may show
  neither /proc nor /dev entries.
  """
  platforms = os.environ.get('JAX_PLATFORMS', '').lower()
  if platforms and not any(p.strip() in ('cuda', 'gpu') for p in platforms.split(',')):
    return False
  visible = os.environ.get('CUDA_VISIBLE_DEVICES')
  if visible is not None and visible.strip() in ('', '-1'):
    return False
  if glob.glob(os.path.join(_PROC_GPUS, '*')) or glob.glob(os.path.join(_DEV, 'nvidia[0-9]*')):
    return True
  return bool(visible) and any(importlib.util.find_spec(p) for p in _CUDA_PLUGINS)


def gpu_count() -> int:
  """GPUs this process can see, without importing jax (0 when none)."""
  if not gpu_present():
    return 0
  visible = os.environ.get('CUDA_VISIBLE_DEVICES')
  if visible:
    return len([v for v in visible.split(',') if v.strip()])
  nodes = glob.glob(os.path.join(_DEV, 'nvidia[0-9]*'))
  return len(nodes) or len(glob.glob(os.path.join(_PROC_GPUS, '*')))
