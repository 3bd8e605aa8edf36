"""Every config file validates; every inconsistency is rejected by name before device work."""

import os
import pathlib
import subprocess
import sys

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / 'configs'
# Devices each config is meant for (the rest run anywhere with -1 filling).
DEVICES = {'codellama_34b': 128, 'codellama_7b': 128, 'codellama_34b_instruct': 128}


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


def test_command_line_typo_names_the_key(tmp_path):
  out = subprocess.run(
    [
      sys.executable,
      '-m',
      'launch',
      'train',
      '--config.model.num_layer=3',
      f'--workdir={tmp_path}',
    ],
    capture_output=True,
    text=True,
    cwd=CONFIGS.parent,
    timeout=120,
  )
  assert out.returncode != 0
  assert out.stderr == (
    'error: --config.model.num_layer: unknown config key (did you mean model.num_layers?)\n'
  )
  assert not list(tmp_path.iterdir())  # Nothing was started.


def test_command_line_inconsistency_is_a_clean_error(tmp_path):
  out = subprocess.run(
    [
      sys.executable,
      '-m',
      'launch',
      'train',
      '--config.model.num_kv_heads=3',
      f'--workdir={tmp_path}',
    ],
    capture_output=True,
    text=True,
    cwd=CONFIGS.parent,
    timeout=120,
    env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
  )
  assert out.returncode == 1
  assert 'error: invalid config:' in out.stderr
  assert 'model.num_heads=4 is not divisible by model.num_kv_heads=3' in out.stderr
  assert 'Traceback' not in out.stderr
