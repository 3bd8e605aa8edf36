"""sbatch scripts: their directives, and their shell logic run against fake srun / scontrol."""

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

from clm_jax.cluster import slurm

ROOT = pathlib.Path(__file__).resolve().parents[2]

TRAIN_ARGS = ['--config=configs/codellama_34b.py', '--workdir=runs/cl34b']

# Stand-ins for the cluster. srun runs its command as tasks 0 and 1, as two
# nodes with one task each would, and passes SIGTERM on to them; python
# records its arguments and, when FAKE_SLEEP is set, runs until SIGTERM.
FAKE_SRUN = """\
#!/bin/bash
printf '%s\\n' "$@" > "$FAKE_LOG/srun.args"
while [[ $1 == -* ]]; do shift; done
pids=()
on_term() { echo TERM >> "$FAKE_LOG/srun.signals"; kill -TERM "${pids[@]}"; }
trap on_term TERM
for i in 0 1; do
  SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NTASKS=2 "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  while true; do
    s=0; wait "$pid" || s=$?
    kill -0 "$pid" 2>/dev/null || break
  done
  (( s > status )) && status=$s
done
exit $status
"""
FAKE_SCONTROL = """\
#!/bin/bash
echo "$*" >> "$FAKE_LOG/scontrol.calls"
# A long list, line by line, as a large allocation gives: a reader that stops
# after the first line would make this writer die of SIGPIPE.
if [[ $1 == show && $2 == hostnames ]]; then
  for i in $(seq 17 3000); do printf 'gpu-%03d\\n' "$i"; done
fi
"""
FAKE_PYTHON = """\
#!/bin/bash
printf '%s\\n' "$@" > "$FAKE_LOG/python.$SLURM_PROCID.args"
if [[ -n ${FAKE_SLEEP:-} ]]; then
  trap 'kill $sleeper; echo TERM > "$FAKE_LOG/python.$SLURM_PROCID.term"; exit 0' TERM
  sleep "$FAKE_SLEEP" & sleeper=$!
  touch "$FAKE_LOG/python.$SLURM_PROCID.started"
  wait $sleeper
fi
exit "${FAKE_STATUS:-0}"
"""


def _script(per, **kwargs):
  return slurm.sbatch_script(TRAIN_ARGS, nodes=16, gpus_per_node=8, per=per, **kwargs)


def _sbatch_options(text):
  return [line.removeprefix('#SBATCH ') for line in text.splitlines() if line.startswith('#SBATCH')]


@pytest.mark.parametrize('per', ['node', 'gpu'])
def test_script_parses_and_declares_the_allocation(per, tmp_path):
  text = _script(per, partition='h100', time='2-00:00:00', account='llm')
  path = slurm.write_sbatch(tmp_path / 'sub' / 'job.sbatch', text)
  assert path.stat().st_mode & 0o777 == 0o755
  assert subprocess.run(['bash', '-n', str(path)], capture_output=True).returncode == 0

  options = _sbatch_options(text)
  tasks = '1' if per == 'node' else '8'
  for option in [
    '--job-name=clm_jax',
    '--nodes=16',
    f'--ntasks-per-node={tasks}',
    '--gpus-per-node=8',
    '--exclusive',
    '--partition=h100',
    '--time=2-00:00:00',
    '--account=llm',
    '--requeue',
    '--signal=B:USR1@300',
    '--open-mode=append',
    '--output=logs/%x-%j.out',
  ]:
    assert option in options
  assert not any(o.startswith('--array') for o in options)
  # All directives precede the first command, or sbatch ignores the rest.
  lines = text.splitlines()
  first_command = next(i for i, line in enumerate(lines) if line and not line.startswith('#'))
  assert max(i for i, line in enumerate(lines) if line.startswith('#SBATCH')) < first_command

  assert 'COORDINATOR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)' in text
  assert '--num_processes="$SLURM_NTASKS"' in text
  assert '--process_id="$SLURM_PROCID"' in text
  assert ('--local_device_ids="$SLURM_LOCALID"' in text) == (per == 'gpu')
  assert '--kill-on-bad-exit=1' in text and '\nTASK_LOG=logs/%x-%j-%t.log\n' in text
  assert '    --config=configs/codellama_34b.py \\\n    --workdir=runs/cl34b \\\n' in text


def _shellcheck(path):
  """Asserts that ShellCheck finds nothing in the script at `path`, at any severity."""
  if shutil.which('shellcheck') is None:
    message = 'shellcheck is not installed; install it with: apt-get install shellcheck'
    if os.environ.get('CI'):  # .ci/run installs it: there, its absence is a failure.
      pytest.fail(message)
    pytest.skip(message)
  out = subprocess.run(['shellcheck', '--norc', str(path)], capture_output=True, text=True)
  assert out.returncode == 0 and not out.stdout.strip(), out.stdout + out.stderr


def test_template_passes_shellcheck():
  _shellcheck(slurm.TEMPLATE)


@pytest.mark.parametrize('per, port', [('node', 0), ('gpu', 12345)])
def test_rendered_script_passes_shellcheck(per, port, tmp_path):
  args = [
    '--config=configs/sweeps/x.py',
    '--trial=$SLURM_ARRAY_TASK_ID',
    '--name=run-${SLURM_ARRAY_JOB_ID}_x',
    'it\'s "quoted" $HOME `x` \\ end',
  ]
  text = slurm.sbatch_script(
    args,
    nodes=2,
    per=per,
    port=port,
    array='0-3',
    command='sweep',
    partition='h100',
    workdir_root='/lustre/me/clm_jax',
    extra_sbatch=('--qos=high',),
  )
  _shellcheck(slurm.write_sbatch(tmp_path / 'job.sbatch', text))


def _fake_cluster(tmp_path):
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  for name, body in [('srun', FAKE_SRUN), ('scontrol', FAKE_SCONTROL), ('python', FAKE_PYTHON)]:
    (bin_dir / name).write_text(body)
    (bin_dir / name).chmod(0o755)
  log = tmp_path / 'fake'
  log.mkdir()
  return {
    'PATH': f'{bin_dir}:{os.environ["PATH"]}',
    'FAKE_LOG': str(log),
    'SLURM_JOB_ID': '4242',
    'SLURM_JOB_NODELIST': 'gpu-[017-018]',
    'SLURM_JOB_NUM_NODES': '2',
    'SLURM_NTASKS': '2',
    'SLURM_CPUS_ON_NODE': '96',
    'SLURM_SUBMIT_DIR': str(tmp_path),
    'HOME': str(tmp_path),
  }


def _start(tmp_path, text, **env):
  script = slurm.write_sbatch(tmp_path / 'job.sbatch', text)
  return subprocess.Popen(
    ['bash', str(script)],
    env={**_fake_cluster(tmp_path), **env},
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def _argv(tmp_path, task):
  return (tmp_path / 'fake' / f'python.{task}.args').read_text().splitlines()


def _wait_for(paths, timeout=5.0):
  deadline = time.monotonic() + timeout
  while not all(p.exists() for p in paths):
    assert time.monotonic() < deadline, f'timed out waiting for {paths}'
    time.sleep(0.02)


@pytest.mark.parametrize('per', ['node', 'gpu'])
def test_each_task_gets_its_distributed_flags(per, tmp_path):
  tricky = 'it\'s "quoted" $HOME `x` \\ end'
  text = slurm.sbatch_script(
    [*TRAIN_ARGS, f'--config.train.note={tricky}'], nodes=2, gpus_per_node=8, per=per
  )
  proc = _start(tmp_path, text)
  out, _ = proc.communicate(timeout=10)
  assert proc.returncode == 0, out
  assert 'coordinator gpu-017:24242' in out  # 20000 + 4242 % 20000
  # per='node' on 2 nodes: 1 task per node, and all 96 cores for it.
  tasks = 1 if per == 'node' else 8
  srun_args = (tmp_path / 'fake' / 'srun.args').read_text().splitlines()
  assert f'--ntasks-per-node={tasks}' in srun_args
  assert f'--cpus-per-task={96 // tasks}' in srun_args
  for task in (0, 1):
    argv = _argv(tmp_path, task)
    expected = ['-m', 'launch', 'train', *TRAIN_ARGS, f'--config.train.note={tricky}']
    expected += [
      '--coordinator_address=gpu-017:24242',
      '--num_processes=2',
      f'--process_id={task}',
    ]
    if per == 'gpu':
      expected.append(f'--local_device_ids={task}')
    assert argv == expected
  assert (tmp_path / 'logs').is_dir()
  assert 'requeue' not in (tmp_path / 'fake' / 'scontrol.calls').read_text()


def test_exit_status_is_the_trainings(tmp_path):
  proc = _start(tmp_path, _script('node', port=12345), FAKE_STATUS='3')
  out, _ = proc.communicate(timeout=10)
  assert proc.returncode == 3, out
  assert 'coordinator gpu-017:12345' in out
  assert 'requeue' not in (tmp_path / 'fake' / 'scontrol.calls').read_text()


def test_usr1_stops_training_once_then_requeues(tmp_path):
  proc = _start(tmp_path, _script('node'), FAKE_SLEEP='20')
  fake = tmp_path / 'fake'
  _wait_for([fake / 'python.0.started', fake / 'python.1.started'])
  proc.send_signal(signal.SIGUSR1)
  out, _ = proc.communicate(timeout=10)
  assert proc.returncode == 0, out
  assert (fake / 'srun.signals').read_text() == 'TERM\n'  # one SIGTERM: a second aborts the save
  assert (fake / 'python.0.term').exists() and (fake / 'python.1.term').exists()
  calls = (fake / 'scontrol.calls').read_text().splitlines()
  assert calls[-1] == 'requeue 4242'
  assert 'requeueing job 4242' in out


def test_sigterm_to_the_batch_shell_waits_without_forwarding(tmp_path):
  # Slurm signals the tasks itself; the shell only has to outlive them.
  proc = _start(tmp_path, _script('node'), FAKE_SLEEP='1', FAKE_STATUS='0')
  fake = tmp_path / 'fake'
  _wait_for([fake / 'python.0.started', fake / 'python.1.started'])
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=10)
  assert proc.returncode == 0, out
  assert not (fake / 'srun.signals').exists()
  assert not (fake / 'python.0.term').exists()
  assert 'requeue' not in (fake / 'scontrol.calls').read_text()


def test_array_task_id_expands_at_run_time(tmp_path):
  text = slurm.sbatch_script(
    ['--config=configs/sweeps/x.py', '--trial=$SLURM_ARRAY_TASK_ID'],
    nodes=1,
    array='0-3',
    command='sweep',
  )
  options = _sbatch_options(text)
  assert '--array=0-3' in options and '--output=logs/%x-%A_%a.out' in options
  assert '--trial="$SLURM_ARRAY_TASK_ID"' in text
  proc = _start(tmp_path, text, SLURM_ARRAY_TASK_ID='2', SLURM_ARRAY_JOB_ID='4240')
  out, _ = proc.communicate(timeout=10)
  assert proc.returncode == 0, out
  argv = _argv(tmp_path, 0)
  assert argv[:5] == ['-m', 'launch', 'sweep', '--config=configs/sweeps/x.py', '--trial=2']
  srun_args = (tmp_path / 'fake' / 'srun.args').read_text().splitlines()
  assert '--output=logs/%x-%A_%a-%t.log' in srun_args


def test_launch_slurm_writes_the_16_node_script_for_a_config(tmp_path):
  """`python -m launch slurm` as a user runs it: the original run's 16 x 8 layout."""
  script = tmp_path / 'cl34b.sbatch'
  out = subprocess.run(
    [
      sys.executable,
      '-m',
      'launch',
      'slurm',
      '--config=configs/codellama_34b.py',
      '--nodes',
      '16',
      '--gpus_per_node=8',
      '--time=48:00:00',
      f'--output={script}',
      f'--slurm_logs={tmp_path / "logs"}',
      '--config.train.steps=20000',
    ],
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=120,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert f'sbatch {script}' in out.stdout
  assert (tmp_path / 'logs').is_dir()
  text = script.read_text()
  assert subprocess.run(['bash', '-n', str(script)]).returncode == 0
  for line in (
    '#SBATCH --nodes=16',
    '#SBATCH --ntasks-per-node=1',
    '#SBATCH --time=48:00:00',
    '#SBATCH --requeue',
    '#SBATCH --job-name=codellama_34b',
  ):
    assert line in text
  # The training flags travel; the slurm-only ones do not.
  for arg in ('--config=configs/codellama_34b.py', '--config.train.steps=20000'):
    assert arg in text
  assert '--workdir=runs/codellama_34b' in text
  assert '--nodes' not in text.split('exec python -m launch')[1]
