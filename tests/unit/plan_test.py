"""The planner against the real model, XLA's compiled step and hand-computed figures."""

import importlib
import pathlib

import jax
import pytest

from clm_jax import config as config_lib
from clm_jax.model import decoder as model_lib
from clm_jax.plan import estimate
from clm_jax.plan import report
from clm_jax.plan import xla_memory
from configs import default

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIGS = sorted(p.stem for p in (ROOT / 'configs').glob('*.py') if p.stem != '__init__')


@pytest.mark.parametrize('name', CONFIGS)
def test_param_count_equals_the_real_model(name):
  c = importlib.import_module(f'configs.{name}').get_config()
  cfg = config_lib.ModelConfig.from_config(c.model)
  _, abstract, _ = model_lib.abstract(cfg)
  assert estimate.param_count(cfg) == model_lib.param_count(abstract)


def _small(**overrides):
  c = default.get_config()
  c.model.dtype = 'bfloat16'
  c.model.remat = 'full'
  c.mesh.data = 1
  for key, value in overrides.items():
    section, name = key.split('__')
    c[section][name] = value
  return c


# Small configs on meshes up to 8 devices: one device, long rows (attention-
# dominated), data x tensor, a 2 x 2 x 2 pipeline, a 4-stage pipeline with
# fewer micro-batches in flight than per step, a circular schedule, FSDP, the
# projections saved (alone and under a circular schedule), and no remat.
# Where saved activations dominate the cases run in float32: XLA:CPU keeps
# bfloat16 activations as float32 (it holds the same bytes for both), which
# GPUs do not, and the estimate counts what a GPU holds.
CASES = {
  'one_device': {},
  'long_rows': dict(train__seq_len=1024, train__global_batch_size=4),
  'data_tensor': dict(mesh__data=4, mesh__tensor=2, train__microbatches=2),
  'pipeline_2x2x2': dict(mesh__data=2, mesh__tensor=2, mesh__pipeline=2, train__microbatches=4),
  'pipeline_4': dict(
    mesh__data=2, mesh__pipeline=4, train__microbatches=8, mesh__pipeline_microbatches=4
  ),
  'circular': dict(mesh__pipeline=2, mesh__virtual_stages=2, train__microbatches=4),
  'fsdp': dict(mesh__data=8, mesh__fsdp=True),
  'save_dots': dict(model__remat='save_dots', mesh__tensor=2),
  'save_dots_circular_fp32': dict(
    model__remat='save_dots',
    model__dtype='float32',
    mesh__pipeline=2,
    mesh__virtual_stages=2,
    train__microbatches=4,
  ),
  'no_remat_fp32': dict(model__remat='none', model__dtype='float32'),
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_memory_within_15_percent_of_xla(case):
  c = _small(**CASES[case])
  devices = c.mesh.data * c.mesh.tensor * c.mesh.pipeline
  compiled = xla_memory.measure(c, jax.devices()[:devices])
  mem = estimate.memory(c, estimate.layout_of(c, devices))
  # The state is exact: it is the real sharding of the real shapes.
  assert mem.params + mem.optimizer == pytest.approx(compiled['arguments'], rel=0.01)
  assert mem.total == pytest.approx(compiled['total'], rel=0.15), (mem, compiled)


def test_time_follows_the_stated_mfu():
  c = default.get_config()
  p = estimate.plan(c, 1, estimate.DEVICE_TYPES['h100-80gb'], mfu=0.5, search=0)
  tokens_per_step = c.train.global_batch_size * c.train.seq_len
  step = p['flops_per_token'] * tokens_per_step / (989e12 * 0.5)
  assert p['at_mfu']['step_seconds'] == pytest.approx(step)
  assert p['at_mfu']['days'] == pytest.approx(step * c.train.steps / 86400)
  assert p['fits'] and 'suggestions' not in p


def test_a_config_that_does_not_fit_is_reported_with_layouts_that_do():
  c = default.get_config()
  c.model.d_model, c.model.mlp_dim, c.model.num_layers = 2048, 5632, 24
  c.train.global_batch_size, c.train.seq_len, c.model.remat = 64, 1024, 'none'
  p = estimate.plan(c, 1, estimate.DEVICE_TYPES['a100-40gb'], mfu=0.4)
  assert not p['fits'] and p['memory_gib']['total'] > 36
  for s in p['suggestions']:
    assert s['memory_gib'] <= 36
  # The whole batch at once without remat is what does not fit: every fitting
  # layout splits it into micro-batches or recomputes, most often both.
  assert p['suggestions']
  for s in p['suggestions']:
    assert (
      '--config.train.microbatches=1 ' not in s['overrides'] or 'remat=none' not in s['overrides']
    )
  assert p['suggestions'][0]['mfu_ceiling'] >= p['suggestions'][-1]['mfu_ceiling']


def test_suggestions_are_valid_configs():
  c = default.get_config()  # float32 compute: cuDNN attention would be refused.
  for dtype, cudnn_allowed in (('float32', False), ('bfloat16', True)):
    c.model.dtype = dtype
    p = estimate.plan(c, 1, estimate.DEVICE_TYPES['h100-80gb'], mfu=0.4, search=100)
    kernels = {s['overrides'].split('attention=')[1] for s in p['suggestions']}
    assert kernels == ({'xla', 'cudnn'} if cudnn_allowed else {'xla'})
    for s in p['suggestions']:
      suggested = c.copy_and_resolve_references()
      for flag in s['overrides'].split():
        key, value = flag.removeprefix('--config.').split('=')
        section, name = key.split('.')
        suggested[section][name] = type(suggested[section][name])(value)
      config_lib.validate(suggested, 1)


def test_unknown_device_type_is_a_config_error():
  with pytest.raises(config_lib.ConfigError, match='plan.device_type'):
    estimate.device_type('tpu-v9')


def _codellama_34b(devices_per_node):
  c = importlib.import_module('configs.codellama_34b').get_config()
  c.plan.devices_per_node = devices_per_node
  return c


# The 34B mesh (data 4 x tensor 8 x pipeline 4) on 128 devices: device
# (d, t, p) is the ((4 d + p) 8 + t)-th in process order, so with 8 per node a
# tensor group is one node; with 4 per node it is two.
@pytest.mark.parametrize(
  ('per_node', 'nodes', 'spans'),
  [
    (8, 16, {'data': 4, 'tensor': 1, 'pipeline': 4}),
    (4, 32, {'data': 4, 'tensor': 2, 'pipeline': 4}),
    (128, 1, {'data': 1, 'tensor': 1, 'pipeline': 1}),
  ],
)
def test_plan_names_the_mesh_axes_that_cross_nodes(per_node, nodes, spans):
  p = estimate.plan(
    _codellama_34b(per_node), 128, estimate.DEVICE_TYPES['a100-80gb'], 0.4, search=0
  )
  across = [axis for axis in ('data', 'tensor', 'pipeline') if spans[axis] > 1]
  assert p['placement'] == {
    'devices_per_node': per_node,
    'nodes': nodes,
    'nodes_per_group': spans,
    'across_nodes': across,
  }
  text = report.describe(p)
  line = next(x for x in text.splitlines() if x.startswith('nodes '))
  if per_node == 8:
    assert line.endswith(
      '16 nodes of 8 devices: tensor within a node; data groups span 4 nodes, pipeline groups span 4 nodes'
    )
  if per_node == 4:
    assert 'tensor groups span 2 nodes' in line
    assert 'tensor crosses nodes' in text
  else:
    assert 'tensor crosses nodes' not in text
  if per_node == 128:
    assert line.endswith('1 node of 128 devices: every axis within a node')


@pytest.mark.parametrize('bad', [0, -8])
def test_devices_per_node_must_be_positive(bad):
  with pytest.raises(config_lib.ConfigError, match=rf'plan.devices_per_node: .*{bad}'):
    estimate.plan(_codellama_34b(bad), 128, estimate.DEVICE_TYPES['a100-80gb'], 0.4, search=0)
