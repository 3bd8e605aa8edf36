"""Several processes over the JAX distributed runtime on 127.0.0.1, as on a cluster.

Two processes with 4 CPU devices each train the (data=2, tensor=2,
pipeline=2) mesh and must follow the one-process 8-device run; they are
killed and restarted; one of them dies and the other must not outlive it.
"""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from clm_jax.cluster import spawn
from tests.helpers import cli

STEPS = 30
FLAGS = [
  *cli.TINY,
  f'--config.train.steps={STEPS}',
  '--config.train.log_every=1',
  '--config.train.microbatches=2',
  '--config.checkpoint.every=5',
  '--config.mesh.data=2',
  '--config.mesh.tensor=2',
  '--config.mesh.pipeline=2',
]


def _env(cache, devices):
  return {**cli.env(cache), 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'}


def _start(workdir, cache, *extra, devices):
  return subprocess.Popen(
    [sys.executable, '-m', 'launch', 'train', *FLAGS, f'--workdir={workdir}', *extra],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    cwd=cli.ROOT,
    env=_env(cache, devices),
  )


def _start_pair(workdir, cache, *extra):
  """Processes 0 and 1 of one run, 4 CPU devices each."""
  address = f'127.0.0.1:{spawn.free_port()}'
  return [
    _start(
      workdir,
      cache,
      f'--coordinator_address={address}',
      '--num_processes=2',
      f'--process_id={i}',
      *extra,
      devices=4,
    )
    for i in range(2)
  ]


def _losses(workdir):
  """{step: (loss, grad_norm)}; where a step is logged twice, the later line counts."""
  out = {}
  for line in (workdir / 'metrics.jsonl').read_text().splitlines():
    m = json.loads(line)
    if 'loss' in m:
      out[m['step']] = (m['loss'], m['grad_norm'])
  return out


def _assert_same_run(got, want):
  assert sorted(got) == sorted(want)
  # gloo sums across processes in another order than one process does.
  np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)], 1e-6)


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp('cache')


@pytest.fixture(scope='module')
def reference(cache, tmp_path_factory):
  """The one-process, 8-device run."""
  workdir = tmp_path_factory.mktemp('reference')
  p = _start(workdir, cache, devices=8)
  _, err = p.communicate(timeout=600)
  assert p.returncode == 0, err[-3000:]
  return _losses(workdir)


def test_two_spawned_processes_train_like_one(reference, cache, tmp_path):
  out = subprocess.run(
    [sys.executable, '-m', 'launch', 'train', *FLAGS, f'--workdir={tmp_path}', '--spawn=2'],
    capture_output=True,
    text=True,
    cwd=cli.ROOT,
    env=_env(cache, 4),
    timeout=600,
  )
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert f'[process 0] step {STEPS}/{STEPS}' in out.stdout
  # Only process 0 writes metrics and progress.
  assert '[process 1] step' not in out.stdout
  _assert_same_run(_losses(tmp_path), reference)


def _wait_for_checkpoint(workdir, step, procs):
  deadline = time.monotonic() + 300
  while not (workdir / 'checkpoints' / str(step)).is_dir():
    assert all(p.poll() is None for p in procs), procs[0].communicate()[1][-3000:]
    assert time.monotonic() < deadline
    time.sleep(0.05)


def test_preempted_then_killed_then_restarted_is_still_the_same_run(reference, cache, tmp_path):
  # SIGTERM to process 1 only: both stop at the same step, save together, exit 0.
  procs = _start_pair(tmp_path, cache)
  _wait_for_checkpoint(tmp_path, 5, procs)
  procs[1].send_signal(signal.SIGTERM)
  errs = [p.communicate(timeout=300)[1] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], errs[0][-3000:] + errs[1][-3000:]
  stopped = [int(e.split(': saved step ')[1].split(';')[0]) for e in errs]
  assert stopped[0] == stopped[1] < STEPS
  assert (tmp_path / 'checkpoints' / str(stopped[0])).is_dir()

  # Both resume, then both are killed (kill -9) after the next checkpoint.
  procs = _start_pair(tmp_path, cache)
  _wait_for_checkpoint(tmp_path, (stopped[0] // 5 + 1) * 5, procs)
  for p in procs:
    p.kill()
    p.communicate()
  assert max(_losses(tmp_path)) < STEPS  # Killed before the end.

  procs = _start_pair(tmp_path, cache)
  errs = [p.communicate(timeout=600)[1] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], errs[0][-3000:] + errs[1][-3000:]
  assert 'resuming from' in errs[0]
  _assert_same_run(_losses(tmp_path), reference)


def test_a_killed_process_ends_the_other_within_the_heartbeat_timeout(cache, tmp_path):
  timeout = 5
  procs = _start_pair(
    tmp_path, cache, '--config.train.steps=100000', f'--heartbeat_timeout={timeout}'
  )
  metrics = tmp_path / 'metrics.jsonl'
  deadline = time.monotonic() + 300
  while not (metrics.exists() and metrics.stat().st_size):  # Training has begun.
    assert procs[0].poll() is None and time.monotonic() < deadline
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGKILL)
  killed = time.monotonic()
  _, err = procs[0].communicate(timeout=120)
  waited = time.monotonic() - killed
  procs[1].communicate()
  assert procs[0].returncode != 0
  assert waited < timeout + 20, waited
  # The runtime's own message names the lost process (task 1).
  assert 'stopped sending heartbeats' in err and '\n1\n' in err, err[-3000:]


def test_spawn_exit_code_reports_death_by_signal():
  assert spawn.exit_code(-signal.SIGKILL) == 137 and spawn.exit_code(3) == 3
