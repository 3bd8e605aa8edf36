"""The planner: parameters, memory per device, FLOPs and time of a config, before launch.

Arithmetic on the config; no device is touched. Memory per device is the real
sharding of params and optimizer state, the float32 gradient accumulator plus
one micro-batch's gradients, what backward saves (the residuals
`print_saved_residuals` lists, by remat policy and schedule), and the larger
transient of one layer's backward or one loss chunk. `xla_memory` reports XLA's
own figure beside it. Lower-case letters are per-device sizes (x = b T tokens).
"""

import dataclasses
import itertools
import math
import types

import jax
import jax.numpy as jnp

from clm_jax import config as config_lib
from clm_jax.model import decoder as model_lib
from clm_jax.model import flops
from clm_jax.parallel import sharding
from clm_jax.train import pipeline

GIB = 2**30
HOURS_PER_DAY = 24


@dataclasses.dataclass(frozen=True)
class DeviceType:
  name: str
  peak_tflops: float  # Dense bf16 tensor-core peak.
  memory_gib: float  # HBM per device.


DEVICE_TYPES = {
  d.name: d
  for d in (
    DeviceType('a100-40gb', flops.PEAK_TFLOPS['a100'], 40.0),
    DeviceType('a100-80gb', flops.PEAK_TFLOPS['a100'], 80.0),
    DeviceType('h100-80gb', flops.PEAK_TFLOPS['h100'], 80.0),
    DeviceType('h200-141gb', flops.PEAK_TFLOPS['h200'], 141.0),
    DeviceType('b200-180gb', flops.PEAK_TFLOPS['b200'], 180.0),
  )
}

# XLA's pool is this fraction of HBM (gpu_env sets XLA_PYTHON_CLIENT_MEM_FRACTION);
# the rest goes to NCCL and cuDNN workspaces.
POOL_FRACTION = 0.9

# Fitted to XLA's buffer assignment on small configs (tests/unit/plan_test.py):
# the attention probabilities are alive this many times over in one layer's
# backward, and a loss chunk's [rows, V] float32 this many times over.
_SCORE_COPIES = 3
_LOSS_CHUNK_COPIES = 4


def device_type(name: str) -> DeviceType:
  if name not in DEVICE_TYPES:
    raise config_lib.ConfigError(f'plan.device_type: {name!r} is not one of {sorted(DEVICE_TYPES)}')
  return DEVICE_TYPES[name]


def param_count(cfg: config_lib.ModelConfig) -> int:
  """Parameters of the decoder, from the formula (tests check it against the model)."""
  D, F, H, N, K = cfg.d_model, cfg.mlp_dim, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
  block = D * H * (2 * N + 2 * K) + 3 * D * F + 2 * D
  return 2 * cfg.vocab_size * D + cfg.num_layers * block + D


@dataclasses.dataclass(frozen=True)
class Layout:
  """How one optimizer step is laid out over the devices."""

  data: int
  tensor: int
  pipeline: int
  virtual_stages: int
  microbatches: int  # Gradient-accumulation micro-batches per step.
  per_pass: int  # Micro-batches in flight per pipeline pass.
  remat: str
  attention: str
  fsdp: bool

  @property
  def schedule(self) -> pipeline.Schedule:
    return pipeline.make_schedule(
      self.pipeline, self.virtual_stages, self.microbatches, self.per_pass
    )

  def overrides(self) -> str:
    """The --config flags that select this layout."""
    return (
      f'--config.mesh.data={self.data} --config.mesh.tensor={self.tensor} '
      f'--config.mesh.pipeline={self.pipeline} --config.mesh.virtual_stages={self.virtual_stages} '
      f'--config.train.microbatches={self.microbatches} '
      f'--config.mesh.pipeline_microbatches={self.per_pass} '
      f'--config.model.remat={self.remat} --config.model.attention={self.attention}'
    )


def layout_of(c, devices: int) -> Layout:
  data, tensor, pipe = config_lib.mesh_shape(c.mesh, devices)
  return Layout(
    data=data,
    tensor=tensor,
    pipeline=pipe,
    virtual_stages=c.mesh.virtual_stages,
    microbatches=c.train.microbatches,
    per_pass=c.mesh.pipeline_microbatches or c.train.microbatches,
    remat=c.model.remat,
    attention=c.model.attention,
    fsdp=c.mesh.fsdp,
  )


def placement(layout: Layout, devices: int, devices_per_node: int) -> dict:
  """How many nodes one group of each mesh axis spans, as `sharding.make_mesh` lays them out.

  Stand-in devices numbered node by node: one process per node, or a node's
  processes numbered consecutively (Slurm's block distribution) order them so.
  """
  if not isinstance(devices_per_node, int) or devices_per_node < 1:
    raise config_lib.ConfigError(
      f'plan.devices_per_node: must be a positive integer, got {devices_per_node!r}'
    )
  stand_ins = [
    types.SimpleNamespace(id=i, process_index=i // devices_per_node) for i in range(devices)
  ]
  grid = sharding.device_grid(stand_ins, (layout.data, layout.tensor, layout.pipeline))
  spans = sharding.processes_per_group(grid)
  return {
    'devices_per_node': devices_per_node,
    'nodes': math.ceil(devices / devices_per_node),
    'nodes_per_group': spans,
    'across_nodes': [axis for axis in sharding.MESH_AXES if spans[axis] > 1],
  }


def _split(size: int, parts: int) -> int:
  """A dimension's per-device size: split where divisible, else replicated (sharding.py)."""
  return size // parts if size % parts == 0 else size


def _sharded_elements(cfg: config_lib.ModelConfig, layout: Layout) -> tuple[int, int]:
  """(parameter elements per device, one layer's elements per tensor shard)."""
  _, abstract, axes = model_lib.abstract(cfg)
  mesh_shape = {'data': layout.data, 'tensor': layout.tensor, 'pipeline': layout.pipeline}
  rules = sharding.FSDP_RULES if layout.fsdp else sharding.RULES

  def elements(a, x):
    spec = sharding.logical_to_spec(a, x.shape, mesh_shape, rules)
    return math.prod(
      dim // mesh_shape[s] if s else dim for dim, s in zip(x.shape, spec, strict=True)
    )

  sizes = jax.tree.map(elements, axes, abstract, is_leaf=lambda a: isinstance(a, tuple))
  one_layer = param_count(dataclasses.replace(cfg, num_layers=1))
  layer = one_layer - param_count(dataclasses.replace(cfg, num_layers=0))
  return sum(jax.tree.leaves(sizes)), layer // layout.tensor


@dataclasses.dataclass(frozen=True)
class Memory:
  """Bytes per device, by what holds them."""

  params: int
  optimizer: int
  gradients: int
  saved_activations: int
  working_set: int
  batch: int

  @property
  def total(self) -> int:
    return sum(dataclasses.asdict(self).values())


def memory(c, layout: Layout) -> Memory:
  """The train step's bytes per device for config `c` laid out as `layout`."""
  cfg = config_lib.ModelConfig.from_config(c.model)
  p_bytes = jnp.dtype(cfg.param_dtype).itemsize
  a_bytes = jnp.dtype(cfg.dtype).itemsize
  local, layer_params = _sharded_elements(cfg, layout)
  T = c.train.seq_len
  rows = c.train.global_batch_size // layout.microbatches // layout.data  # b
  x = rows * T
  D, H = cfg.d_model, cfg.head_dim
  n = _split(cfg.num_heads, layout.tensor)
  k = _split(cfg.num_kv_heads, layout.tensor)
  f = _split(cfg.mlp_dim, layout.tensor)
  v = _split(cfg.vocab_size, layout.tensor)
  # Layers one pipeline iteration runs on a device (all of them with one stage).
  chunk_layers = cfg.num_layers // (layout.pipeline * layout.virtual_stages)
  casts = layer_params * a_bytes if cfg.dtype != cfg.param_dtype else 0

  # What one block's forward produces (the residuals print_saved_residuals
  # lists with no remat): the stream and its float32 norms, q/k/v, the MLP's
  # six F-wide tensors and, in a lower compute dtype, the weights cast to it;
  # then the attention probabilities: dense [n, T, S] in float32 and the
  # compute dtype for XLA, only the output's log-sum-exp for flash attention.
  block = x * (3 * D * a_bytes + 4 * D * 4 + 6 * f * a_bytes + (n + 2 * k) * H * a_bytes)
  if layout.attention == 'cudnn':
    scores = x * n * 4
  else:
    scores = rows * n * T * T * (a_bytes + 4)
  full_layer = block + scores + casts
  stream = x * D * a_bytes
  per_layer = {
    'full': stream,
    # The projections' outputs (q, k, v, the attention output projection,
    # gate, up and down) and the stream.
    'save_dots': stream + x * ((n + 2 * k) * H + 2 * D + 2 * f) * a_bytes,
    'none': full_layer,
  }[layout.remat]

  schedule = layout.schedule
  # Per pipeline iteration the loss keeps its input (the final norm is
  # recomputed) and the fused loss the gradients of the normed stream and of
  # the head (in the parameter dtype).
  loss_residuals = 2 * stream + D * v * p_bytes
  if schedule.stages > 1 and layout.remat == 'full':
    # The whole stage is rematerialised: only its input is kept per iteration,
    # and one chunk's layers while that chunk's backward runs.
    saved = schedule.iterations * (stream + loss_residuals) + chunk_layers * stream
  else:
    saved = schedule.iterations * (chunk_layers * per_layer + loss_residuals)
  # One layer's backward: its recomputed forward, the attention's float32
  # probabilities once more for their gradient, and FSDP's gathered weights.
  layer_backward = block + _SCORE_COPIES * scores + (layer_params * a_bytes if layout.fsdp else 0)
  chunk = c.train.loss_chunk_len or T
  loss_chunk = _LOSS_CHUNK_COPIES * rows * chunk * v * 4
  return Memory(
    params=local * p_bytes,
    optimizer=2 * local * p_bytes,
    gradients=local * (4 + p_bytes * (1 if schedule.iterations * layout.microbatches == 1 else 2)),
    saved_activations=saved,
    working_set=max(layer_backward, loss_chunk),
    batch=c.train.global_batch_size // layout.data * T * 4 * 3,
  )


def recompute_factor(cfg: config_lib.ModelConfig, remat: str, seq_len: int) -> float:
  """Hardware FLOPs / model FLOPs: what remat recomputes of the blocks' forward."""
  dense_blocks = 6 * (flops.matmul_params(cfg) - cfg.d_model * cfg.vocab_size)
  attention = 6 * cfg.num_layers * seq_len * cfg.num_heads * cfg.head_dim
  total = flops.train_flops_per_token(cfg, seq_len)
  extra = {'full': (dense_blocks + attention) / 3, 'save_dots': attention / 3, 'none': 0.0}
  return 1.0 + extra[remat] / total


def _fits(mem: Memory, device: DeviceType) -> bool:
  return mem.total <= POOL_FRACTION * device.memory_gib * GIB


def throughput_ceiling(cfg: config_lib.ModelConfig, layout: Layout, seq_len: int) -> float:
  """The MFU this layout allows if every kernel ran at peak: bubble and recompute."""
  return (1 - layout.schedule.bubble) / recompute_factor(cfg, layout.remat, seq_len)


def candidates(c, devices: int, device: DeviceType) -> list[tuple[Layout, Memory]]:
  """Layouts of the config's mesh that fit `device`, the highest MFU ceiling first.

  Varies only what changes neither the model nor the optimizer step (remat,
  attention kernel, micro-batches, virtual stages).
  """
  cfg = config_lib.ModelConfig.from_config(c.model)
  base = layout_of(c, devices)
  B = c.train.global_batch_size
  # cuDNN's packed flash attention needs Hopper or later, and what config.validate asks.
  hopper = device.name.split('-')[0] in ('h100', 'h200', 'b200')
  cudnn_ok = not config_lib.check_attention('cudnn', cfg.dtype, cfg.max_segments, c.train.seq_len)
  kernels = ['xla'] + (['cudnn'] if hopper and cudnn_ok else [])
  found = []
  chunks = cfg.num_layers // base.pipeline
  repeats = [1] if base.pipeline == 1 else [r for r in _divisors(chunks) if r <= 8]
  for microbatches, repeat in itertools.product(_divisors(B), repeats):
    passes = [microbatches] if base.pipeline == 1 else _divisors(microbatches)
    for per_pass in passes:
      if config_lib.check_layout(
        num_layers=cfg.num_layers,
        global_batch_size=B,
        microbatches=microbatches,
        pipeline_microbatches=per_pass,
        data=base.data,
        pipeline=base.pipeline,
        virtual_stages=repeat,
      ):
        continue
      for remat, attention in itertools.product(config_lib.REMAT, kernels):
        layout = dataclasses.replace(
          base,
          virtual_stages=repeat,
          microbatches=microbatches,
          per_pass=per_pass,
          remat=remat,
          attention=attention,
        )
        mem = memory(c, layout)
        if _fits(mem, device):
          found.append((layout, mem))
  # Ties go to fewer, larger micro-batches: bigger matmuls, less loop overhead.
  found.sort(
    key=lambda lm: (-round(throughput_ceiling(cfg, lm[0], c.train.seq_len), 4), lm[0].microbatches)
  )
  return found


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def plan(
  c,
  devices: int,
  device: DeviceType,
  mfu: float,
  tokens: float = 0.0,
  target_days: float = 0.0,
  claimed_gpu_hours: float = 0.0,
  search: int = 5,
) -> dict:
  """The whole plan of config `c` on `devices` devices of type `device`, as plain data.

  Nodes hold `c.plan.devices_per_node` devices each; 'placement' names the
  mesh axes whose groups span more than one.

  Args:
    tokens: The training-token budget; 0 = train.steps x tokens per step.
    target_days: A wall-clock target; the plan gives the MFU it needs. 0 = none.
    claimed_gpu_hours: A source's GPU-hour figure, checked against devices x
      target_days. 0 = none.
    search: How many fitting layouts to list; 0 = none.
  """
  config_lib.validate(c, devices)
  cfg = config_lib.ModelConfig.from_config(c.model)
  layout = layout_of(c, devices)
  T = c.train.seq_len
  tokens_per_step = c.train.global_batch_size * T
  tokens = tokens or c.train.steps * tokens_per_step
  steps = math.ceil(tokens / tokens_per_step)
  per_token = flops.train_flops_per_token(cfg, T)
  peak = device.peak_tflops * 1e12
  nodes = placement(layout, devices, c.plan.devices_per_node)
  mem = memory(c, layout)
  pool = POOL_FRACTION * device.memory_gib * GIB

  def timing(at_mfu: float) -> dict:
    tokens_per_second = at_mfu * peak * devices / per_token
    seconds = tokens / tokens_per_second
    return {
      'mfu': at_mfu,
      'step_seconds': tokens_per_step / tokens_per_second,
      'tokens_per_second': tokens_per_second,
      'tokens_per_second_per_device': tokens_per_second / devices,
      'days': seconds / 86400,
      'device_hours': seconds / 3600 * devices,
    }

  out = {
    'params': param_count(cfg),
    'devices': devices,
    'device': dataclasses.asdict(device),
    'layout': {
      **dataclasses.asdict(layout),
      'rows_per_microbatch_per_device': c.train.global_batch_size
      // layout.microbatches
      // layout.data,
      'layers_per_pipeline_device': cfg.num_layers // layout.pipeline,
      'dtype': cfg.dtype,
    },
    'placement': nodes,
    'memory_gib': {
      **{k: v / GIB for k, v in dataclasses.asdict(mem).items()},
      'total': mem.total / GIB,
    },
    'pool_gib': pool / GIB,
    'fits': mem.total <= pool,
    'headroom_gib': (pool - mem.total) / GIB,
    'flops_per_token': per_token,
    'flops_per_step': per_token * tokens_per_step,
    'tokens_per_step': tokens_per_step,
    'tokens': tokens,
    'steps_for_tokens': steps,
    'train_steps': c.train.steps,
    'pipeline_bubble': layout.schedule.bubble,
    'recompute_factor': recompute_factor(cfg, layout.remat, T),
    'mfu_ceiling': throughput_ceiling(cfg, layout, T),
    'at_mfu': timing(mfu),
  }
  if target_days:
    needed = tokens * per_token / (devices * peak * target_days * 86400)
    out['target'] = {'days': target_days, **timing(needed)}
  if claimed_gpu_hours:
    out['claim'] = {
      'gpu_hours': claimed_gpu_hours,
      'devices_x_target_hours': devices * target_days * HOURS_PER_DAY if target_days else None,
      'days_on_these_devices': claimed_gpu_hours / devices / HOURS_PER_DAY,
      'mfu_implied': tokens * per_token / (claimed_gpu_hours * 3600 * peak),
    }
  if search:
    out['suggestions'] = [
      {
        'overrides': lay.overrides(),
        'memory_gib': m.total / GIB,
        'mfu_ceiling': throughput_ceiling(cfg, lay, T),
        'pipeline_bubble': lay.schedule.bubble,
        'rows_per_microbatch_per_device': c.train.global_batch_size // lay.microbatches // lay.data,
      }
      for lay, m in candidates(c, devices, device)[:search]
    ]
  return out
