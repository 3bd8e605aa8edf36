"""make_mesh's device order: tensor groups within a process (node), then pipeline, data outermost.

Fake CPU devices all belong to process 0, so multi-node layouts use stand-in
devices: hashable objects with the `id`, `process_index`, `platform` and
`device_kind` that jax.sharding.Mesh and jax.make_mesh read.
"""

import dataclasses

import jax
import numpy as np
import pytest

from clm_jax.config import schema
from clm_jax.parallel import sharding


@dataclasses.dataclass(frozen=True)
class StandIn:
  id: int
  process_index: int
  platform: str = 'gpu'
  device_kind: str = 'NVIDIA A100-SXM4-80GB'


def _nodes(processes: int, per_process: int, interleaved: bool = False) -> list[StandIn]:
  """Devices of `processes` processes; `interleaved` numbers them round-robin across processes."""
  return [
    StandIn(id=local * processes + p if interleaved else p * per_process + local, process_index=p)
    for p in range(processes)
    for local in range(per_process)
  ]


def _c_mesh(data, tensor, pipeline):
  c_mesh = schema.get_config().mesh
  c_mesh.update(data=data, tensor=tensor, pipeline=pipeline)
  return c_mesh


def _span(mesh, axis: str) -> int:
  """The most processes that one group of `axis` (devices differing only along it) spans."""
  process = np.vectorize(lambda d: d.process_index)(mesh.devices)
  groups = np.moveaxis(process, list(mesh.axis_names).index(axis), -1)
  return max(len(set(g)) for g in groups.reshape(-1, mesh.shape[axis]))


def test_codellama_34b_layout_on_16_nodes_of_8():
  devices = _nodes(16, 8)
  mesh = sharding.make_mesh(_c_mesh(4, 8, 4), devices[::-1])  # Order given must not matter.
  assert mesh.axis_names == ('data', 'tensor', 'pipeline')
  assert dict(mesh.shape) == {'data': 4, 'tensor': 8, 'pipeline': 4}
  # Megatron-like ranks with data outermost: rank = (d * 4 + p) * 8 + t, and
  # ranks are processes' devices in order: node 4d + p, its local device t.
  for d, t, p in np.ndindex(4, 8, 4):
    device = mesh.devices[d, t, p]
    assert (device.process_index, device.id) == (4 * d + p, (4 * d + p) * 8 + t)
  assert _span(mesh, 'tensor') == 1
  assert _span(mesh, 'pipeline') == 4
  assert _span(mesh, 'data') == 4
  # Data outermost: each data replica is 4 whole, consecutive nodes.
  for d in range(4):
    assert {x.process_index for x in mesh.devices[d].flat} == set(range(4 * d, 4 * d + 4))


def test_tensor_groups_stay_in_a_process_whatever_the_device_ids():
  # Global ids need not number a process's devices consecutively.
  mesh = sharding.make_mesh(_c_mesh(4, 8, 4), _nodes(16, 8, interleaved=True))
  assert _span(mesh, 'tensor') == 1
  assert _span(mesh, 'pipeline') == 4
  for d, p in np.ndindex(4, 4):
    group = mesh.devices[d, :, p]
    assert [x.id for x in group] == sorted(x.id for x in group)


# (processes, devices per process, data, tensor, pipeline) -> the processes one
# group of each axis spans, worked out by hand from "tensor fastest, then
# pipeline, then data" over devices ordered by process.
SPANS = [
  ((16, 8, 4, 8, 4), {'data': 4, 'tensor': 1, 'pipeline': 4}),
  ((4, 8, 4, 2, 4), {'data': 4, 'tensor': 1, 'pipeline': 1}),  # 2 x 4 fill a node.
  ((4, 8, 2, 2, 8), {'data': 2, 'tensor': 1, 'pipeline': 2}),
  ((8, 8, 2, 16, 2), {'data': 2, 'tensor': 2, 'pipeline': 2}),  # Tensor must cross.
  ((2, 8, 16, 1, 1), {'data': 2, 'tensor': 1, 'pipeline': 1}),
  ((128, 1, 4, 8, 4), {'data': 4, 'tensor': 8, 'pipeline': 4}),  # One process per GPU.
  ((1, 8, 2, 2, 2), {'data': 1, 'tensor': 1, 'pipeline': 1}),
]


@pytest.mark.parametrize(('layout', 'spans'), SPANS)
def test_each_axis_spans_the_fewest_processes_in_order(layout, spans):
  processes, per_process, data, tensor, pipeline = layout
  devices = _nodes(processes, per_process)
  mesh = sharding.make_mesh(_c_mesh(data, tensor, pipeline), devices)
  assert {a: _span(mesh, a) for a in mesh.axis_names} == spans
  # The defining order: device (d, t, p) is the ((d * P + p) * T + t)-th by process.
  for d, t, p in np.ndindex(data, tensor, pipeline):
    assert mesh.devices[d, t, p] is devices[(d * pipeline + p) * tensor + t]
  assert sharding.processes_per_group(mesh.devices) == spans


def test_local_mesh_is_unchanged_without_pipeline():
  devices = jax.devices()
  mesh = sharding.make_mesh(_c_mesh(2, 4, 1), devices)
  expected = jax.make_mesh((2, 4, 1), sharding.MESH_AXES, devices=devices)
  assert mesh.axis_names == expected.axis_names
  assert (mesh.devices == expected.devices).all()
  assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 3


def test_local_pipeline_mesh_keeps_tensor_groups_adjacent():
  devices = jax.devices()
  mesh = sharding.make_mesh(_c_mesh(2, 2, 2), devices)
  assert dict(mesh.shape) == {'data': 2, 'tensor': 2, 'pipeline': 2}
  ids = np.vectorize(lambda d: d.id)(mesh.devices)
  # Tensor groups are neighbours 2k, 2k + 1; pipeline stages two apart; data halves.
  np.testing.assert_array_equal(ids, [[[0, 2], [1, 3]], [[4, 6], [5, 7]]])


def test_wrong_device_count_is_refused_by_name():
  with pytest.raises(ValueError, match=r'7 devices .* \(2, 2, 2\)'):
    sharding.device_grid(_nodes(1, 7), (2, 2, 2))
