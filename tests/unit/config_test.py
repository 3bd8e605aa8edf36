"""Every config file validates; every inconsistency is rejected by name before device work."""

import importlib.util
import pathlib

import ml_collections
import pytest

from clm_jax import config as config_lib
from clm_jax.data import sources

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / 'configs'
# Devices each config is meant for (the rest run anywhere with -1 filling).
DEVICES = {'codellama_34b': 128, 'codellama_7b': 128, 'codellama_34b_instruct': 128}


def _load(path):
  spec = importlib.util.spec_from_file_location(f'configs.{path.stem}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.mark.parametrize(
  'path', sorted(p for p in CONFIGS.glob('*.py') if p.stem not in ('__init__', 'base'))
)
def test_every_config_file_loads_and_validates(path):
  c = _load(path)
  config_lib.validate(c, DEVICES.get(path.stem, 1))
  config_lib.ModelConfig.from_config(c.model)


def test_codellama_34b_is_the_original_run():
  c = _load(CONFIGS / 'codellama_34b.py')
  m, t, o = c.model, c.train, c.optim
  assert (m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.mlp_dim) == (
    48,
    8192,
    64,
    8,
    22016,
  )
  assert (m.vocab_size, m.rope_theta, m.norm_eps, m.dtype) == (
    32000,
    1e6,
    1e-5,
    'bfloat16',
  )
  assert (t.seq_len, t.global_batch_size, t.microbatches) == (8192, 4096, 16)
  assert t.steps * t.global_batch_size * t.seq_len >= 500e9
  assert (o.peak_lr, o.warmup_steps, o.b1, o.b2, o.eps) == (3e-4, 2000, 0.9, 0.95, 1e-6)
  assert (o.weight_decay, o.clip_norm) == (0.1, 1.0)
  assert config_lib.mesh_shape(c.mesh, 128) == (4, 8, 4)
  weights = config_lib.parse_mixture(c.data.mixture)
  assert set(weights) == set(sources.LANGUAGES) and sum(weights.values()) == pytest.approx(1)
  assert weights['text'] == pytest.approx(0.15) and c.data.fim_rate == 0


def test_codellama_7b_trains_with_infilling():
  c = _load(CONFIGS / 'codellama_7b.py')
  assert (c.model.num_layers, c.model.d_model, c.model.num_kv_heads) == (32, 4096, 32)
  assert (c.data.fim_rate, c.data.fim_spm_rate) == (0.9, 0.5)


BAD = [
  (
    {'model.num_kv_heads': 3},
    1,
    'model.num_heads=8 is not divisible by model.num_kv_heads=3',
  ),
  (
    {'mesh.tensor': 3, 'mesh.data': 1},
    3,
    'model.num_heads=8 is not divisible by mesh.tensor=3',
  ),
  ({'model.mlp_dim': 100, 'mesh.tensor': 8, 'mesh.data': 1}, 8, 'model.mlp_dim=100'),
  (
    {'model.vocab_size': 250, 'mesh.tensor': 4, 'mesh.data': 2},
    8,
    'model.vocab_size=250',
  ),
  ({'train.global_batch_size': 6, 'train.microbatches': 4}, 1, 'train.microbatches=4'),
  ({'train.global_batch_size': 24, 'data.streams': 16}, 1, 'data.streams=16 must divide'),
  ({'train.code_eval_tasks': 'humaneval,apps'}, 1, "train.code_eval_tasks: ['apps']"),
  (
    {'data.source': 'instruct', 'data.path': 'x.jsonl', 'data.fim_rate': 0.5},
    1,
    "data.source='instruct': data.fim_rate and data.mixture",
  ),
  (
    {'train.global_batch_size': 8, 'train.microbatches': 2, 'mesh.data': 8},
    8,
    'not divisible by mesh.data=8',
  ),
  ({'mesh.data': 2, 'mesh.tensor': 2}, 8, '= 4 ('),
  ({'mesh.data': -1, 'mesh.tensor': 3}, 8, 'mesh.data=-1 cannot fill 8 devices'),
  ({'mesh.data': -1, 'mesh.tensor': -1}, 8, 'at most one -1'),
  (
    {'mesh.pipeline': 2, 'mesh.data': 4},
    8,
    '1 micro-batches per pipeline pass (train.microbatches, mesh.pipeline_microbatches) are fewer',
  ),
  ({'mesh.virtual_stages': 2}, 1, 'mesh.virtual_stages=2 needs mesh.pipeline > 1'),
  (
    {'train.microbatches': 4, 'mesh.pipeline_microbatches': 3},
    1,
    'mesh.pipeline_microbatches=3 must be 0 or divide train.microbatches=4',
  ),
  ({'mesh.virtual_stages': 0}, 1, 'mesh.virtual_stages: must be >= 1'),
  (
    {'mesh.pipeline': 2, 'mesh.virtual_stages': 2, 'train.microbatches': 2},
    2,
    'model.num_layers=2 is not divisible by mesh.pipeline=2 x mesh.virtual_stages=2',
  ),
  (
    {
      'model.num_layers': 8,
      'mesh.pipeline': 4,
      'mesh.virtual_stages': 2,
      'train.global_batch_size': 12,
      'train.microbatches': 6,
    },
    4,
    '6 micro-batches per pipeline pass (train.microbatches, mesh.pipeline_microbatches) are not a multiple of mesh.pipeline=4',
  ),
  ({'train.seq_len': 128}, 1, 'train.seq_len=128 exceeds model.max_seq_len=64'),
  ({'model.d_model': 0}, 1, 'model.d_model: must be > 0'),
  ({'train.steps': -5}, 1, 'train.steps: must be > 0'),
  ({'optim.b2': 1.0}, 1, 'optim.b2: must be in [0, 1)'),
  ({'model.d_model': 72}, 1, 'even integer head_dim'),
  ({'model.remat': 'some'}, 1, "model.remat: 'some' is not one of"),
  ({'model.dtype': 'bf16'}, 1, "model.dtype: 'bf16' is not one of"),
  ({'train.loss_chunk_len': 5}, 1, 'train.loss_chunk_len=5 must be 0 or divide'),
  ({'data.heldout_fraction': 1.0}, 1, 'data.heldout_fraction'),
  ({'data.fim_rate': 1.5}, 1, 'data.fim_rate: must be in [0, 1]'),
  ({'data.mixture': 'python=1'}, 1, "data.mixture='python=1': bad entry"),
  ({'data.mixture': 'python:0.5,rust:0.5'}, 1, "'rust' is not one of"),
  ({'data.source': 'prepared'}, 1, "data.path: data.source='prepared' needs a path"),
  ({'data.workers': -1}, 1, 'data.workers: must be >= 0'),
]


@pytest.mark.parametrize('overrides,devices,message', BAD)
def test_bad_config_is_rejected_by_name(tiny_config, overrides, devices, message):
  c = tiny_config
  for key, value in overrides.items():
    section, name = key.split('.')
    c[section][name] = value
  with pytest.raises(config_lib.ConfigError, match=None) as e:
    config_lib.validate(c, devices)
  assert message in str(e.value)


def test_unknown_and_mistyped_keys(tiny_config):
  c = tiny_config
  with pytest.raises(AttributeError, match='num_layer'):
    c.model.num_layer = 3  # base.get_config() is locked: typos fail at once.
  # A config that did not come from base.py (a hand-edited config.json):
  d = c.to_dict()
  d['model']['num_layer'] = 3
  d['train']['steps'] = '10'
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(ml_collections.ConfigDict(d), 1)
  assert 'model.num_layer: unknown config key (did you mean model.num_layers?)' in str(e.value)
  assert "train.steps: expected int, got '10'" in str(e.value)
