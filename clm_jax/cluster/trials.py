"""Running a sweep: its trials one after another, each a `python -m launch train`.

A trial's outcome goes to its `status.json`: 'done' (trained to train.steps),
'failed' (a non-zero exit) or 'interrupted' (stopped by a signal after saving).
"""

import dataclasses
import json
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import threading
import time

from clm_jax.cluster import slurm
from clm_jax.cluster import summary
from clm_jax.cluster import sweep as sweep_lib


@dataclasses.dataclass(frozen=True)
class Result:
  """How one trial ended in `run`."""

  trial: sweep_lib.Trial
  status: str  # 'done' | 'failed' | 'interrupted'
  returncode: int | None  # None when skipped (done before).
  seconds: float
  skipped: bool = False


class _StopOnSignal:
  """SIGTERM / SIGINT on the sweep: the running trial saves and exits, then the sweep stops.

  Ctrl-C reaches the whole process group and Slurm signals every process of its
  job, so only a SIGTERM outside Slurm is passed on, once per signal received:
  one more would be a second signal, on which training exits without saving.
  """

  def __init__(self, env):
    self.signal = None
    self._forward = 'SLURM_JOB_ID' not in (os.environ if env is None else env)
    self._received = self._sent = 0
    self._proc = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():  # Where handlers can go.
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    return False

  def _handle(self, signum, frame):
    del frame
    self.signal = signal.Signals(signum).name
    # os.write: print() from a handler can interrupt the main thread's own print.
    os.write(2, f'{self.signal}: stopping the sweep once the running trial has saved.\n'.encode())
    if signum == signal.SIGTERM and self._forward:
      self._received += 1
      self._pass_on()

  def _pass_on(self):
    while self._proc is not None and self._sent < self._received and self._proc.poll() is None:
      self._sent += 1
      self._proc.send_signal(signal.SIGTERM)

  def wait(self, proc: subprocess.Popen) -> int:
    self._proc = proc
    try:
      self._pass_on()  # A signal that came while the trial was starting.
      return proc.wait()
    finally:
      self._proc = None


def _run_trial(sweep, trial, trial_dir, stop, *, python, extra_args, env, process_id):
  prefix = f'[{sweep.name} {trial.index + 1}/{len(sweep.trials)}] {trial.name}:'
  previous = summary.read_status(trial_dir)
  if previous.get('status') == 'done':
    print(f'{prefix} done before; skipped', flush=True)
    return Result(trial, 'done', None, 0.0, skipped=True)
  again = ' again' if trial_dir.exists() else ''
  trial_dir.mkdir(parents=True, exist_ok=True)
  command = sweep_lib.train_command(sweep, trial, trial_dir, python=python, extra_args=extra_args)
  # Each process of a multi-host trial has its own log; the first writes the outcome.
  log_path = trial_dir / ('train.log' if process_id == 0 else f'train.{process_id}.log')
  print(f'{prefix} started{again}; log {log_path}', flush=True)
  start = time.monotonic()
  with open(log_path, 'a') as log:  # Appended: a resumed trial keeps its earlier attempts.
    log.write(f'$ {shlex.join(command)}\n')
    log.flush()
    proc = subprocess.Popen(
      command, cwd=sweep_lib.ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    returncode = stop.wait(proc)
  seconds = time.monotonic() - start
  # A trial stopped by a signal saves and exits 0 too: only its metrics tell it from done.
  complete = summary.is_complete(trial_dir)
  if returncode == 0 and complete:
    status, note = 'done', f'done in {seconds:.0f}s'
  elif returncode == 0 or stop.signal:
    step = summary.read_curves(trial_dir).last_step
    status, note = 'interrupted', f'interrupted after logged step {step}; run again to resume'
  else:
    status, note = 'failed', f'failed (exit {returncode}) after {seconds:.0f}s; see {log_path}'
  if process_id == 0:
    record = {
      'status': status,
      'returncode': returncode,
      'overrides': {**sweep.overrides, **trial.overrides},
      'seconds': round(seconds, 1),
    }
    summary.write_atomic(trial_dir / summary.STATUS, json.dumps(record, indent=2))
  print(f'{prefix} {note}', flush=True)
  return Result(trial, status, returncode, seconds)


def run(
  sweep: sweep_lib.Sweep,
  workdir,
  *,
  python: str = sys.executable,
  extra_args=(),
  trial: int | None = None,
  env=None,
  process_id: int = 0,
) -> list[Result]:
  """Runs the sweep's trials one after another, skipping those done before.

  A failed trial does not stop the sweep; SIGTERM or SIGINT does, after the
  running trial saves. `trial` runs one index only (a Slurm array task); of a
  multi-host trial only `process_id` 0 records status.json.
  """
  n = len(sweep.trials)
  if trial is not None and not 0 <= trial < n:
    raise sweep_lib.SweepError(f'{sweep.path}: no trial {trial}; the sweep has trials 0 to {n - 1}')
  trials = sweep.trials if trial is None else [sweep.trials[trial]]
  workdir = pathlib.Path(workdir).absolute()  # The trials run in the repository root.
  results = []
  with _StopOnSignal(env) as stop:
    for t in trials:
      if stop.signal:
        break
      results.append(
        _run_trial(
          sweep,
          t,
          workdir / t.name,
          stop,
          python=python,
          extra_args=tuple(extra_args),
          env=env,
          process_id=process_id,
        )
      )
    if stop.signal:
      print(f'[{sweep.name}] stopped by {stop.signal}; run the sweep again to go on.', flush=True)
  return results


def default_workdir(sweep: sweep_lib.Sweep) -> pathlib.Path:
  return pathlib.Path('runs') / 'sweeps' / sweep.name


def main(sweep_path, workdir=None, trial=None, *, extra_args=(), process_id: int = 0) -> int:
  """`python -m launch sweep`: runs (or resumes) a sweep, then writes its summary.

  Returns the exit status: 0 when every trial run (or skipped) is done, else 1.
  """
  sweep = sweep_lib.load(sweep_path)
  workdir = pathlib.Path(workdir) if workdir else default_workdir(sweep)
  results = run(sweep, workdir, trial=trial, extra_args=extra_args, process_id=process_id)
  if process_id == 0:
    summary.summarize(sweep, workdir)
    print(f'Summary: {workdir}/summary.md, summary.csv, loss_curves.png', flush=True)
  return 0 if results and all(r.status == 'done' for r in results) else 1


def slurm_script(sweep: sweep_lib.Sweep, sweep_path, workdir, **slurm_kwargs) -> str:
  """An sbatch job array with one array task per trial (`--trial=$SLURM_ARRAY_TASK_ID`).

  Paths are as the job will name them; `slurm_kwargs` go to `slurm.sbatch_script`.
  """
  slurm_kwargs.setdefault('job_name', f'sweep-{sweep.name}')
  args = [f'--config={sweep_path}', f'--workdir={workdir}', '--trial=$SLURM_ARRAY_TASK_ID']
  return slurm.sbatch_script(
    args, command='sweep', array=f'0-{len(sweep.trials) - 1}', **slurm_kwargs
  )
