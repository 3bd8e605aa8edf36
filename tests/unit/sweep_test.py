"""Sweeps: sweep files validated by key, trials really trained, interrupted and resumed."""

import json
import pathlib

import pytest

from clm_jax.cluster import summary
from clm_jax.cluster import sweep
from clm_jax.cluster import trials

# The tiny model of tests/cli.py, 10 steps: seconds per trial on one CPU device.
TINY = {
  'model.vocab_size': 512,
  'model.d_model': 64,
  'model.num_layers': 2,
  'model.mlp_dim': 128,
  'train.seq_len': 64,
  'train.loss_chunk_len': 32,
  'train.global_batch_size': 8,
  'train.log_every': 5,
  'train.eval_batches': 2,
  'optim.warmup_steps': 5,
  'checkpoint.every': 10,
  'data.tokenizer_sample_mb': 1,
  'train.steps': 10,
}
GRID = {'optim.peak_lr': [0.01, 0.003], 'optim.warmup_steps': [2, 5]}
NAMES = [
  '000-peak_lr=0.01,warmup_steps=2',
  '001-peak_lr=0.01,warmup_steps=5',
  '002-peak_lr=0.003,warmup_steps=2',
  '003-peak_lr=0.003,warmup_steps=5',
]


def _write_sweep(path: pathlib.Path, spec: dict) -> pathlib.Path:
  path.write_text(f'def get_sweep():\n  return {spec!r}\n')
  return path


@pytest.mark.parametrize(
  ('spec', 'message'),
  [
    ({'grid': {'optim.peak_lrr': [1e-3]}}, 'grid: optim.peak_lrr: not a key of configs/default.py'
     ' (did you mean optim.peak_lr?)'),
    ({'trials': [{}, {'model': {'d_modl': 8}}]}, 'trials[1]: model.d_modl: not a key'),
    ({'overrides': {'train.stepz': 5}, 'trials': [{}]}, 'overrides: train.stepz: not a key'),
    ({'grid': {'train.steps': [1.5]}}, 'grid: train.steps=1.5'),
    ({'grid': {'train.steps': [1]}, 'trials': [{}]}, 'give exactly one of grid and trials'),
    ({'overrides': {}}, 'give exactly one of grid and trials'),
    ({'grid': {'train.steps': []}}, 'grid: train.steps: needs a non-empty list'),
    ({'trials': []}, 'trials: needs a non-empty list'),
    ({'base': 'configs/nope.py', 'trials': [{}]}, 'base: configs/nope.py not found'),
    ({'base': None, 'trials': [{}], 'nmae': 'x'}, "unknown field(s) ['nmae']"),
  ],
)  # fmt: skip
def test_a_bad_sweep_file_is_rejected_by_name(tmp_path, spec, message):
  spec = {'base': 'configs/default.py', **spec}
  with pytest.raises(sweep.SweepError) as e:
    sweep.load(_write_sweep(tmp_path / 'bad.py', spec))
  assert str(e.value).startswith(f'{tmp_path / "bad.py"}: ') and message in str(e.value)


def test_summary_counts_the_later_line_of_a_step_logged_twice(tmp_path):
  s = sweep.load(
    _write_sweep(tmp_path / 's.py', {'base': 'configs/default.py', 'trials': [{}, {}]})
  )
  trial_dir = tmp_path / 'runs' / s.trials[0].name
  trial_dir.mkdir(parents=True)
  lines = [
    {'step': 1, 'loss': 6.0, 'lr': 0.0},
    {'step': 5, 'loss': 5.0, 'tokens_per_sec': 100.0},
    {'step': 5, 'eval_loss': 5.5},
    {'step': 5, 'loss': 4.0, 'tokens_per_sec': 300.0},  # Logged again after a resume.
    {'step': 10, 'loss': 3.0, 'tokens_per_sec': 200.0},
    {'step': 10, 'eval_loss': 3.5},
  ]
  text = ''.join(json.dumps(m) + '\n' for m in lines) + '{"step": 15, "lo'  # Cut mid-write.
  (trial_dir / 'metrics.jsonl').write_text(text)
  (trial_dir / 'config.json').write_text(json.dumps({'train': {'steps': 10}}))

  rows = summary.summarize(s, tmp_path / 'runs')
  assert rows[0] == {
    'trial': '000-base',
    'status': 'unfinished',
    'final_loss': 3.0,
    'eval_loss': 3.5,
    'tokens_per_sec': 250.0,  # Median of 300 and 200: the first line at step 5 is replaced.
    'steps': 10,
  }
  assert rows[1]['status'] == 'pending' and rows[1]['final_loss'] is None
  assert [m['loss'] for m in summary.read_curves(trial_dir).train] == [6.0, 4.0, 3.0]
  assert summary.is_complete(trial_dir)
  assert (tmp_path / 'runs' / 'loss_curves.png').read_bytes().startswith(b'\x89PNG')


def test_slurm_script_is_a_job_array_of_one_task_per_trial(tmp_path):
  s = sweep.load(_write_sweep(tmp_path / 'lr.py', {'base': 'configs/default.py', 'grid': GRID}))
  text = trials.slurm_script(s, 'sweeps/lr.py', 'runs/sweeps/lr', nodes=1, partition='gpu')
  assert '#SBATCH --array=0-3' in text
  assert '#SBATCH --job-name=sweep-lr' in text and '#SBATCH --partition=gpu' in text
  assert 'python -m launch sweep' in text
  assert '--config=sweeps/lr.py' in text and '--workdir=runs/sweeps/lr' in text
  assert '--trial="$SLURM_ARRAY_TASK_ID"' in text
