"""Checkpoints: exact resume after kill -9 and SIGTERM, damaged steps refused or set aside."""

import json
import pathlib
import random
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from clm_jax.ckpt import params as params_lib
from tests.helpers import cli

STEPS = 16
FLAGS = [
  f'--config.train.steps={STEPS}',
  '--config.train.log_every=1',
  '--config.train.eval_every=8',
  '--config.checkpoint.every=4',
]
EXACT = ('loss', 'lr', 'grad_norm', 'target_tokens', 'eval_loss')


def _metrics(workdir) -> dict[int, dict]:
  """step -> the exact metrics of its lines, the later line winning (the contract)."""
  out = {}
  for line in (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines():
    m = json.loads(line)
    out.setdefault(m['step'], {}).update({k: m[k] for k in EXACT if k in m})
  return out


def _logged_steps(workdir) -> int:
  path = pathlib.Path(workdir) / 'metrics.jsonl'
  if not path.exists():
    return 0
  steps = [json.loads(line)['step'] for line in path.read_text().splitlines() if line]
  return max(steps, default=0)


def _wait_for(condition, proc, timeout=300):
  deadline = time.time() + timeout
  while not condition():
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert time.time() < deadline, 'timed out'
    time.sleep(0.005)


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp('cache')


@pytest.fixture(scope='module')
def reference(tmp_path_factory, cache):
  workdir = tmp_path_factory.mktemp('reference')
  cli.train(workdir, cache, *FLAGS)
  return _metrics(workdir)


def test_kill_9_at_a_random_step_then_resume_is_bitwise_the_same_run(reference, cache, tmp_path):
  kill_at = random.Random().randint(5, 11)
  proc = cli.start_train(tmp_path, cache, *FLAGS)
  _wait_for(lambda: _logged_steps(tmp_path) >= kill_at, proc)
  proc.kill()
  proc.wait()
  assert _logged_steps(tmp_path) < STEPS
  cli.train(tmp_path, cache, *FLAGS)
  assert _metrics(tmp_path) == reference, f'killed at step {kill_at}'


def test_kill_9_during_an_async_save_keeps_the_previous_checkpoint(reference, cache, tmp_path):
  checkpoints = tmp_path / 'checkpoints'

  def finished():
    return [int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()]

  def saving_after_a_finished_one():  # Orbax writes under a temporary name, then renames.
    return (
      checkpoints.is_dir() and finished() and any('tmp' in p.name for p in checkpoints.iterdir())
    )

  proc = cli.start_train(tmp_path, cache, *FLAGS, '--config.checkpoint.every=3')
  _wait_for(saving_after_a_finished_one, proc)
  proc.kill()
  proc.wait()
  last = max(finished())
  assert last < STEPS
  out = cli.train(tmp_path, cache, *FLAGS, '--config.checkpoint.every=3')
  assert f'resuming from {checkpoints}/{last}' in out.stderr
  assert _metrics(tmp_path) == reference
  assert not any('tmp' in p.name for p in checkpoints.iterdir())


def test_sigterm_saves_and_exits_0_and_the_next_start_resumes(reference, cache, tmp_path):
  proc = cli.start_train(tmp_path, cache, *FLAGS)
  _wait_for(lambda: _logged_steps(tmp_path) >= 6, proc)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 0, stderr[-3000:]
  assert 'SIGTERM: finishing this step, saving' in stderr
  saved = max(int(p.name) for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit())
  # The save came from the signal, whichever step it landed on.
  assert 6 <= saved < STEPS and f'SIGTERM: saved step {saved}; exiting' in stderr
  out = cli.train(tmp_path, cache, *FLAGS)
  assert f'resuming from {tmp_path / "checkpoints"}/{saved}' in out.stderr
  assert _metrics(tmp_path) == reference


def _flip_4k_of_the_state(step_dir: pathlib.Path, files='*'):
  """Inverts 4 KiB of the largest of the state's `files`; 8 KiB in, where floats are stored raw."""
  paths = (p for p in (step_dir / 'state').rglob(files) if p.is_file())
  path = max(paths, key=lambda p: p.stat().st_size)
  data = bytearray(path.read_bytes())
  data[8192 : 8192 + 4096] = bytes(b ^ 0xFF for b in data[8192 : 8192 + 4096])
  path.write_bytes(bytes(data))


def _files(directory: pathlib.Path) -> dict[str, bytes]:
  return {
    str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob('*') if p.is_file()
  }


def test_every_checkpoint_damaged_is_one_error_until_restart_from_scratch(cache, tmp_path):
  checkpoints = tmp_path / 'checkpoints'
  flags = ['--config.train.steps=8', '--config.checkpoint.every=4', '--config.train.log_every=1']
  cli.train(tmp_path, cache, *flags)
  first = _metrics(tmp_path)
  for step in ('4', '8'):
    _flip_4k_of_the_state(checkpoints / step)
  before = _files(checkpoints)

  out = cli.train(tmp_path, cache, *flags, check=False)
  assert out.returncode == 1
  errors = [line for line in out.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and f'every checkpoint in {checkpoints} is damaged: step 8: ' in errors[0]
  assert '; step 4: ' in errors[0] and 'differs from its checksum' in errors[0]
  warned = [line for line in out.stderr.splitlines() if ' is damaged (' in line]
  assert [w.split('] ', 1)[1].split(' (')[0] for w in warned] == [
    f'checkpoint {checkpoints / "8"} is damaged',
    f'checkpoint {checkpoints / "4"} is damaged',
  ]
  for noise in ('Traceback', 'Event loop is closed', 'tensorstore_spec'):
    assert noise not in out.stderr
  assert _files(checkpoints) == before  # Nothing overwritten, nothing moved.

  out = cli.train(tmp_path, cache, *flags, '--restart_from_scratch')
  assert 'resuming from' not in out.stderr
  # From step 0 again: the same run as the first, step for step.
  lines = (tmp_path / 'metrics.jsonl').read_text().splitlines()
  assert [json.loads(line)['step'] for line in lines].count(1) == 2
  assert _metrics(tmp_path) == first
  assert sorted(p.name for p in checkpoints.iterdir()) == ['4', '4.damaged', '8', '8.damaged']
  kept = {
    name.replace('.damaged', '', 1): body
    for name, body in _files(checkpoints).items()
    if name.split('/')[0].endswith('.damaged')
  }
  assert kept == before


def test_two_processes_fall_back_to_the_same_step(cache, tmp_path):
  flags = [
    *cli.TINY,
    f'--workdir={tmp_path}',
    '--config.train.steps=10',
    '--config.train.log_every=1',
    '--config.checkpoint.every=5',
    '--config.train.microbatches=2',
    '--config.mesh.data=2',
    '--config.mesh.tensor=2',
    '--config.mesh.pipeline=2',
    '--spawn=2',
  ]
  env = {**cli.env(cache), 'XLA_FLAGS': '--xla_force_host_platform_device_count=4'}

  def train():
    out = subprocess.run(
      [sys.executable, '-m', 'launch', 'train', *flags],
      capture_output=True, text=True, cwd=cli.ROOT, env=env, timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout + out.stderr  # The spawner relays its processes' logs to stdout.

  train()
  first = _metrics(tmp_path)
  checkpoints = tmp_path / 'checkpoints'
  # Process 1 wrote this file and process 0 checks it: both must take step 5, or
  # the first collective of training waits forever.
  _flip_4k_of_the_state(checkpoints / '10', 'ocdbt.process_1/**/*')
  log = train()
  assert log.count(f'resuming from {checkpoints}/5') == 2
  assert log.count(f'checkpoint {checkpoints / "10"} is damaged') == 1
  assert sorted(p.name for p in checkpoints.iterdir()) == ['10', '10.damaged', '5']
  assert _metrics(tmp_path) == first  # Steps 6 to 10 again, exactly.


def test_another_model_shape_is_a_clear_error(cache, tmp_path):
  cli.train(tmp_path, cache, '--config.train.steps=2')
  out = cli.train(
    tmp_path, cache, '--config.train.steps=4', '--config.model.mlp_dim=96', check=False
  )
  assert out.returncode != 0
  assert 'params/blocks/mlp/w_down has shape (2, 128, 64) but this model needs (2, 96, 64)' in (
    out.stderr
  )
  assert 'Traceback' not in out.stderr


def test_convert_to_params_writes_a_small_bf16_params_only_checkpoint(cache, tmp_path):
  run = tmp_path / 'run'
  cli.train(run, cache, '--config.train.steps=2')
  out = cli.launch(
    'convert', '--to_params', '--dtype=bfloat16', f'--workdir={run}', f'--output={tmp_path / "p"}',
    cache=cache,
  )  # fmt: skip
  assert 'Wrote the params of step 2' in out.stdout
  params, config, tokenizer_bytes = params_lib.load_params(tmp_path / 'p')
  assert tokenizer_bytes == (run / 'tokenizer.model').read_bytes()
  assert config['model']['d_model'] == 64
  with ocp.StandardCheckpointer() as reader:  # Orbax itself, no code of ours.
    state = reader.restore(run / 'checkpoints' / '2' / 'state')
  want = jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16), state['params'])
  assert jax.tree.structure(params) == jax.tree.structure(want)
  jax.tree.map(
    lambda a, b: np.testing.assert_array_equal(np.asarray(a), b) or a.dtype == jnp.bfloat16,
    params,
    want,
  )
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
  size = lambda d: sum(p.stat().st_size for p in d.rglob('*') if p.is_file())  # noqa: E731
  assert size(tmp_path / 'p') < size(run / 'checkpoints' / '2' / 'state') / 3
  again = cli.launch(
    'convert', '--to_params', f'--workdir={run}', f'--output={tmp_path / "p"}', cache=cache,
    check=False,
  )  # fmt: skip
  assert again.returncode != 0 and 'exists' in again.stderr


def test_a_second_signal_exits_at_once(tmp_path):
  script = tmp_path / 'stop.py'
  script.write_text(
    'import os, signal, time\n'
    'from clm_jax.train import preemption\n'
    'with preemption.StopRequest() as stop:\n'
    '  os.kill(os.getpid(), signal.SIGTERM)\n'
    '  assert stop.requested(1) and stop.signal_name == "SIGTERM"\n'
    '  print("first handled", flush=True)\n'
    '  os.kill(os.getpid(), signal.SIGINT)\n'
    '  time.sleep(30)\n'
  )
  out = subprocess.run(
    [sys.executable, str(script)], capture_output=True, text=True, cwd=cli.ROOT, timeout=60
  )
  assert out.stdout == 'first handled\n'
  assert out.returncode == 128 + signal.SIGINT
  assert 'SIGINT again: exiting now' in out.stderr
