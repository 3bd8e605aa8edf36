"""The device mesh and the one table that maps logical axes onto it.

Shardings are derived from the table and the arrays' shapes, never written out
per parameter.
"""

from collections.abc import Mapping
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from clm_jax import config as config_lib

MESH_AXES = ('data', 'tensor', 'pipeline')

# Megatron-style tensor parallelism: q/k/v/gate/up are column-parallel (their
# output axis `heads`/`kv_heads`/`mlp` over 'tensor'), o/down row-parallel
# (their input axis over 'tensor'), embedding and LM head vocab-parallel.
# A dimension that a mesh axis does not divide (kv heads fewer than the
# tensor size) is replicated instead of split; `config.validate` rejects the
# cases where that would be silently wasteful.
RULES: Mapping[str, str | None] = {
  'batch': 'data',
  'seq': None,
  'embed': None,
  'vocab': 'tensor',
  'heads': 'tensor',
  'kv_heads': 'tensor',
  'head_dim': None,
  'mlp': 'tensor',
  'norm': None,
  # Stacked layers split over 'pipeline' in contiguous blocks: device s holds
  # stage s's layers (see clm_jax.train.pipeline for the circular layout).
  'layers': 'pipeline',
  'stage': 'pipeline',
}

# ZeRO-3 / FSDP: parameters and optimizer state also split over 'data' along
# the model width; XLA all-gathers each layer's weights where they are used.
FSDP_RULES: Mapping[str, str | None] = {**RULES, 'embed': 'data'}


def make_mesh(c_mesh, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A (data, tensor, pipeline) mesh over `devices` (default: all), laid out by `device_grid`."""
  devices = list(jax.devices() if devices is None else devices)
  shape = config_lib.mesh_shape(c_mesh, len(devices))
  return jax.sharding.Mesh(
    device_grid(devices, shape),
    MESH_AXES,
    axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
  )


def device_grid(devices: Sequence, shape: Sequence[int]) -> np.ndarray:
  """`devices` as a [data, tensor, pipeline] array: 'tensor' fastest, then 'pipeline', 'data' last.

  Devices are taken in (process_index, id) order, so a tensor group no larger
  than a process's devices stays inside one process (one node, with one
  process per node or a node's processes numbered consecutively, as Slurm's
  block distribution does), pipeline stages fill the rest of a process and
  then neighbouring ones, and data replicas are farthest apart: MaxText's
  order (data, stage, ..., tensor). Megatron's default differs only above the
  tensor axis: it puts pipeline outermost, data between.

  Args:
    devices: Objects with `process_index` and `id`: jax Devices, or stand-ins.
    shape: (data, tensor, pipeline) sizes; their product is len(devices).
  """
  data, tensor, pipe = shape
  if data * tensor * pipe != len(devices):
    raise ValueError(
      f'{len(devices)} devices cannot form a (data, tensor, pipeline) mesh of {tuple(shape)}'
    )
  # Written out rather than jax.make_mesh / mesh_utils: on GPU those order
  # devices by id alone and lay them out with the last mesh axis ('pipeline')
  # fastest, so a tensor group strides across nodes; create_hybrid_device_mesh
  # needs every axis split into a within- and an across-process factor, and
  # orders processes with 'pipeline' inside 'tensor'.
  ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
  flat = np.fromiter(ordered, dtype=object, count=len(ordered))
  return flat.reshape(data, pipe, tensor).transpose(0, 2, 1)


def processes_per_group(grid: np.ndarray) -> dict[str, int]:
  """For each mesh axis, the most processes that one of its groups spans.

  A group is the devices differing only along that axis: those its
  collectives join. 1 means they stay within a process.
  """
  process = np.vectorize(lambda d: d.process_index, otypes=[int])(grid)
  out = {}
  for i, name in enumerate(MESH_AXES):
    groups = np.moveaxis(process, i, -1).reshape(-1, grid.shape[i])
    out[name] = max(len(set(group.tolist())) for group in groups)
  return out


def rules_for(c_mesh) -> Mapping[str, str | None]:
  return FSDP_RULES if c_mesh.fsdp else RULES


def logical_to_spec(
  axes: Sequence[str | None],
  shape: Sequence[int],
  mesh_shape: Mapping[str, int],
  rules: Mapping[str, str | None] = RULES,
) -> P:
  """PartitionSpec for an array with logical `axes`, given the mesh sizes."""
  used = set()
  spec = []
  for name, dim in zip(axes, shape, strict=True):
    mesh_axis = rules[name] if name is not None else None
    size = mesh_shape[mesh_axis] if mesh_axis is not None else 1
    # An axis of size 1 splits nothing; leaving it out keeps specs readable.
    if size == 1 or mesh_axis in used or dim % size:
      spec.append(None)
    else:
      used.add(mesh_axis)
      spec.append(mesh_axis)
  return P(*spec)


def param_shardings(axes, abstract_params, mesh: jax.sharding.Mesh, rules=RULES):
  """NamedShardings for a params tree from its logical axes and shapes."""
  return jax.tree.map(
    lambda a, x: NamedSharding(mesh, logical_to_spec(a, x.shape, mesh.shape, rules)),
    axes,
    abstract_params,
    is_leaf=lambda a: isinstance(a, tuple),
  )


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Rows over 'data', the sequence whole: for every [B, T] batch array."""
  return NamedSharding(mesh, P('data', None))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """Pins an activation's sharding by logical axes under the current mesh (none: identity)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh.shape))


def stage_mesh_axis() -> str | None:
  """The mesh axis of the pipeline's stage axis, or None outside a mesh."""
  return None if jax.sharding.get_abstract_mesh().empty else RULES['stage']


def constrain_stage(x: jax.Array) -> jax.Array:
  """Pins a leading stage axis to the pipeline mesh axis, the rest left free."""
  axis = stage_mesh_axis()
  if axis is None:
    return x
  free = (P.UNCONSTRAINED,) * (x.ndim - 1)
  return jax.lax.with_sharding_constraint(x, P(axis, *free))


def process_rows(mesh: jax.sharding.Mesh, batch_size: int) -> tuple[int, int]:
  """The rows [lo, hi) of every global batch that this process's devices hold.

  One contiguous block, as `device_grid` puts 'data' outermost over devices in
  process order; processes differing only along 'tensor' or 'pipeline' hold
  the same rows.
  """
  indices = batch_sharding(mesh).addressable_devices_indices_map((batch_size, 1)).values()
  starts = sorted({index[0].indices(batch_size)[:2] for index in indices})
  lo, hi = starts[0][0], starts[-1][1]
  covered = sum(stop - start for start, stop in starts)
  if covered != hi - lo:
    raise ValueError(f'process {jax.process_index()} holds rows {starts}, not one block.')
  return lo, hi


def host_to_global(
  batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh, batch_size: int | None = None
) -> dict:
  """Global [batch_size, ...] arrays from this process's rows (`process_rows`) of a batch.

  Without `batch_size`, every process is taken to hold its own equal share.
  """
  sharding = batch_sharding(mesh)
  out = {}
  for key, value in batch.items():
    value = np.asarray(value)
    global_shape = None if batch_size is None else (batch_size, *value.shape[1:])
    out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
  return out
