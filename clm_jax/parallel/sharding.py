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
  """A (data, tensor, pipeline) mesh over `devices` (default: all devices)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = config_lib.mesh_shape(c_mesh, len(devices))
  return jax.make_mesh(
    shape,
    MESH_AXES,
    axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
    devices=devices,
  )


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

  One contiguous block, as jax.make_mesh keeps a process's devices together;
  processes differing only along 'tensor' or 'pipeline' hold the same rows.
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
