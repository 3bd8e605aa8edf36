"""Sweeps: sweep files validated by key, trials really trained, interrupted and resumed."""

import csv
import json
import math
import pathlib
import signal
import subprocess
import sys
import time
import types

import pytest

from clm_jax.cluster import summary
from clm_jax.cluster import sweep
from clm_jax.cluster import trials
from tests.helpers import cli

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


def _metrics(trial_dir) -> list[dict]:
  return [json.loads(line) for line in (trial_dir / 'metrics.jsonl').read_text().splitlines()]


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  """One CPU device per trial; a tokenizer and compilation cache shared by the module."""
  cache = tmp_path_factory.mktemp('cache')
  out = cli.env(cache)  # The first trial trains the tokenizer; the others reuse it.
  out['JAX_COMPILATION_CACHE_DIR'] = str(cache / 'xla')  # Trials differ only in optim.*.
  out.pop('SLURM_JOB_ID', None)  # The sweep passes SIGTERM on only outside Slurm.
  return out


def _start_main(sweep_file, workdir, env) -> subprocess.Popen:
  return subprocess.Popen(
    [sys.executable, '-m', 'launch', 'sweep', f'--config={sweep_file}', f'--workdir={workdir}'],
    cwd=cli.ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


@pytest.fixture(scope='module')
def interrupted_then_resumed(tmp_path_factory, env):
  """A 4-trial sweep run as: trial 0 alone; the rest, stopped by SIGTERM in trial 1; again.

  Returns what each stage left, for the tests below to check.
  """
  tmp = tmp_path_factory.mktemp('sweep')
  sweep_file = _write_sweep(
    tmp / 'tiny_lr.py', {'base': 'configs/default.py', 'overrides': TINY, 'grid': GRID}
  )
  workdir = tmp / 'runs'
  s = sweep.load(sweep_file)
  out = types.SimpleNamespace(sweep=s, workdir=workdir, dirs=[workdir / n for n in NAMES])

  out.first = trials.run(s, workdir, trial=0, env=env)  # As one Slurm array task would.
  out.trial0_files = {
    name: ((out.dirs[0] / name).stat().st_mtime_ns, (out.dirs[0] / name).read_bytes())
    for name in ('status.json', 'train.log', 'metrics.jsonl')
  }

  # The whole sweep, stopped while trial 1 compiles: its Writer has opened metrics.jsonl,
  # then it takes seconds of tracing before step 1, so SIGTERM lands inside the run.
  proc = _start_main(sweep_file, workdir, env)
  deadline = time.monotonic() + 240
  while not (out.dirs[1] / 'metrics.jsonl').exists():
    assert proc.poll() is None, proc.stdout.read()
    assert time.monotonic() < deadline, 'trial 1 never started training'
    time.sleep(0.05)
  time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  out.stopped_stdout, _ = proc.communicate(timeout=240)
  out.stopped_rc = proc.returncode
  out.stopped_status = summary.read_status(out.dirs[1])
  out.stopped_metrics = _metrics(out.dirs[1])
  out.trial2_started = out.dirs[2].exists()

  proc = _start_main(sweep_file, workdir, env)
  out.resumed_stdout, _ = proc.communicate(timeout=480)
  out.resumed_rc = proc.returncode
  return out


def test_a_sweep_trains_every_trial_and_summarizes_them(interrupted_then_resumed):
  r = interrupted_then_resumed
  assert [x.status for x in r.first] == ['done'] and r.first[0].trial.name == NAMES[0]
  assert r.resumed_rc == 0, r.resumed_stdout[-4000:]

  with open(r.workdir / 'summary.csv') as f:
    rows = list(csv.DictReader(f))
  assert [row['trial'] for row in rows] == NAMES
  assert [row['status'] for row in rows] == ['done'] * 4
  assert [(float(row['optim.peak_lr']), int(row['optim.warmup_steps'])) for row in rows] == [
    (0.01, 2),
    (0.01, 5),
    (0.003, 2),
    (0.003, 5),
  ]
  for row, trial_dir in zip(rows, r.dirs, strict=True):
    lines = _metrics(trial_dir)
    last_loss = [m for m in lines if 'loss' in m][-1]['loss']
    assert float(row['final_loss']) == pytest.approx(last_loss, rel=1e-12)
    assert math.isfinite(last_loss) and 2 < last_loss < 7  # ln(512) = 6.24 at the start.
    assert float(row['eval_loss']) == [m for m in lines if 'eval_loss' in m][-1]['eval_loss']
    assert int(row['steps']) == 10 and float(row['tokens_per_sec']) > 0
  # The learning rate matters: same warmup, different peak, different loss.
  assert abs(float(rows[0]['final_loss']) - float(rows[2]['final_loss'])) > 1e-3

  md = (r.workdir / 'summary.md').read_text()
  assert md.count('| done |') == 4 and all(f'| {name} |' in md for name in NAMES)
  assert md.split('\n\n', 1)[1] in r.resumed_stdout  # The table is printed as well.
  png = (r.workdir / 'loss_curves.png').read_bytes()
  assert png.startswith(b'\x89PNG\r\n\x1a\n') and len(png) > 20_000


def test_an_interrupted_sweep_resumes_where_it_stopped(interrupted_then_resumed):
  r = interrupted_then_resumed
  # Stopped: trial 1 saved at the step it was on and is not done; nothing after it ran.
  assert r.stopped_rc == 1, r.stopped_stdout[-4000:]
  assert 'stopped by SIGTERM' in r.stopped_stdout
  assert r.stopped_status['status'] == 'interrupted' and r.stopped_status['returncode'] == 0
  assert r.stopped_status['overrides'] == {**TINY, 'optim.peak_lr': 0.01, 'optim.warmup_steps': 5}
  stopped_steps = [m['step'] for m in r.stopped_metrics if 'loss' in m]
  assert stopped_steps and stopped_steps[-1] < 10
  assert not r.trial2_started

  # Resumed: trial 0 skipped without a touch, trial 1 continued from its checkpoint.
  assert f'{NAMES[0]}: done before; skipped' in r.resumed_stdout
  for name, (mtime, content) in r.trial0_files.items():
    path = r.dirs[0] / name
    assert (path.stat().st_mtime_ns, path.read_bytes()) == (mtime, content), name
  log = (r.dirs[1] / 'train.log').read_text().splitlines()
  starts = [i for i, line in enumerate(log) if line.startswith('$ ')]  # One per attempt.
  assert len(starts) == 2 and any('resuming from' in line for line in log[starts[1] :])
  steps = [m['step'] for m in _metrics(r.dirs[1]) if 'loss' in m]
  assert steps[: len(stopped_steps)] == stopped_steps and steps[-1] == 10
  assert sorted(set(steps)) == [1, 5, 10]
  assert [summary.read_status(d)['status'] for d in r.dirs] == ['done'] * 4


def test_failed_trials_are_recorded_and_the_sweep_goes_on(tmp_path, env):
  # Rejected by config validation before any device work: seconds each.
  sweep_file = _write_sweep(
    tmp_path / 'bad.py',
    {
      'base': 'configs/default.py',
      'overrides': TINY,
      'trials': [{'model.num_heads': 3}, {'model.num_kv_heads': 3}],
    },
  )
  s = sweep.load(sweep_file)
  results = trials.run(s, tmp_path / 'runs', env=env)
  assert [(x.status, x.returncode) for x in results] == [('failed', 1), ('failed', 1)]
  for trial in s.trials:
    trial_dir = tmp_path / 'runs' / trial.name
    assert summary.read_status(trial_dir)['status'] == 'failed'
    assert 'error: ' in (trial_dir / 'train.log').read_text()
  rows = summary.summarize(s, tmp_path / 'runs')
  assert [row['status'] for row in rows] == ['failed', 'failed']
  assert [row['model.num_heads'] for row in rows] == [3, None]
  assert rows[0]['final_loss'] is None and rows[0]['steps'] == 0


def test_grid_expands_first_key_slowest_into_safe_names(tmp_path):
  spec = {
    'base': 'configs/default.py',
    'overrides': {'train': {'steps': 7}},
    'grid': {**GRID, 'data.path': ['/a b/c']},
    'name': 'lr',
  }
  s = sweep.load(_write_sweep(tmp_path / 's.py', spec))
  assert s.name == 'lr' and s.base == cli.ROOT / 'configs' / 'default.py'
  assert s.overrides == {'train.steps': 7}
  assert [t.name for t in s.trials] == [f'{n},path=_a_b_c' for n in NAMES]
  assert [t.index for t in s.trials] == [0, 1, 2, 3]
  assert s.trials[2].overrides == {
    'optim.peak_lr': 0.003,
    'optim.warmup_steps': 2,
    'data.path': '/a b/c',
  }
  assert s.keys == ['optim.peak_lr', 'optim.warmup_steps', 'data.path']
  assert trials.default_workdir(s) == pathlib.Path('runs/sweeps/lr')
  command = sweep.train_command(s, s.trials[2], '/w/t', python='py', extra_args=['--x=1'])
  assert command == [
    'py', '-m', 'launch', 'train', f'--config={s.base}', '--config.train.steps=7',
    '--config.optim.peak_lr=0.003', '--config.optim.warmup_steps=2',
    '--config.data.path=/a b/c', '--workdir=/w/t', '--x=1',
  ]  # fmt: skip

  assert sweep.trial_name(12, {'a.x': 1e-05, 'b.flag': True}) == '012-x=1e-05,flag=true'
  assert sweep.trial_name(3, {'model.dtype': 'f', 'data.dtype': 'g'}, width=4) == (
    '0003-model.dtype=f,data.dtype=g'
  )  # A shared last part stays whole.
  assert sweep.trial_name(0, {}) == '000-base'
  assert len(sweep.trial_name(0, {'k': 'x' * 500})) == 104


def test_every_shipped_sweep_file_loads():
  paths = sorted((cli.ROOT / 'configs' / 'sweeps').glob('[!_]*.py'))
  assert paths
  for path in paths:
    assert sweep.load(path).trials, path
  s = sweep.load(cli.ROOT / 'configs' / 'sweeps' / 'lr_warmup.py')
  assert len(s.trials) == 4 and s.overrides['train.steps'] == 200


def test_launch_sweep_slurm_writes_the_job_array(tmp_path):
  script = tmp_path / 'lr.sbatch'
  out = subprocess.run(
    [
      sys.executable,
      '-m',
      'launch',
      'sweep',
      '--config',
      'configs/sweeps/lr_warmup.py',
      '--slurm',
      '--nodes=2',
      f'--output={script}',
      f'--slurm_logs={tmp_path / "logs"}',
    ],
    capture_output=True,
    text=True,
    cwd=cli.ROOT,
    timeout=120,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  text = script.read_text()
  assert subprocess.run(['bash', '-n', str(script)]).returncode == 0
  assert '#SBATCH --array=0-3' in text and '#SBATCH --nodes=2' in text
  assert '--config=configs/sweeps/lr_warmup.py' in text
  assert '--workdir=runs/sweeps/lr_warmup' in text
