"""Writes sbatch scripts that run `python -m launch train` across Slurm nodes.

The script starts one srun step whose tasks each run one training process:
one per node owning all of the node's GPUs (`per='node'`), or one per GPU
(`per='gpu'`). Every process is told the coordinator (the first node), the
process count and its own id as explicit flags, so nothing depends on JAX
detecting Slurm by itself.

Time limits and preemption: Slurm sends the batch shell USR1 five minutes
before the limit; the shell sends the step one SIGTERM, the training saves a
checkpoint and exits 0, and the shell then requeues the job, which resumes
from that checkpoint under the same job id. The shell requeues only after the
step has exited because requeueing a running job makes Slurm kill it, which
could cut the save short.
"""

import pathlib
import re
import shlex

PER = ('node', 'gpu')
# Flags the script sets itself for each process.
DISTRIBUTED_FLAGS = ('coordinator_address', 'num_processes', 'process_id', 'local_device_ids')
# Seconds between the warning signal and the time limit: room for one step and a save.
WARNING_SECONDS = 300

# `$SLURM_X` or `${SLURM_X}` inside an argument stays a reference, expanded by
# each task at run time (the sweep's `--trial=$SLURM_ARRAY_TASK_ID`).
_SLURM_REF = re.compile(r'\$(?:(SLURM_[A-Z0-9_]+)|\{(SLURM_[A-Z0-9_]+)\})')


def _quote_literal(text: str) -> str:
  """Shell-quotes `text`; double quotes where it holds a single quote.

  The task command is single-quoted once more for `bash -c`; a single quote
  escaped at both levels would be unreadable in the script.
  """
  if "'" not in text:
    return shlex.quote(text)
  return '"' + re.sub(r'(["\\$`])', r'\\\1', text) + '"'


def _quote(arg: str) -> str:
  """Shell-quotes `arg`, leaving `$SLURM_*` references expandable in double quotes."""
  parts = []
  pos = 0
  for match in _SLURM_REF.finditer(arg):
    if match.start() > pos:
      parts.append(_quote_literal(arg[pos : match.start()]))
    parts.append(f'"${match.group(1) or match.group(2)}"')
    pos = match.end()
  if pos < len(arg) or not parts:
    parts.append(_quote_literal(arg[pos:]))
  return ''.join(parts)


def _validate(train_args, *, nodes, gpus_per_node, per, port, command, extra_sbatch, **words):
  if nodes < 1:
    raise ValueError(f'--nodes must be at least 1, got {nodes}')
  if gpus_per_node < 1:
    raise ValueError(f'--gpus_per_node must be at least 1, got {gpus_per_node}')
  if per not in PER:
    raise ValueError(f'--per must be one of {PER}, got {per!r}')
  if not 0 <= port < 65536:
    raise ValueError(f'--port must be in [0, 65535] (0: derived from the job id), got {port}')
  if not command.split():
    raise ValueError('command must name a launch command, e.g. train')
  for arg in train_args:
    name = arg.lstrip('-').split('=', 1)[0]
    if arg.startswith('-') and name in DISTRIBUTED_FLAGS:
      raise ValueError(f'--{name} is set by the script for each process; leave it out')
    if 'SLURM_ARRAY_TASK_ID' in arg and not words['array']:
      raise ValueError(f'{arg!r} refers to SLURM_ARRAY_TASK_ID, which needs --array')
  for line in extra_sbatch:
    if '\n' in line:
      raise ValueError(f'extra sbatch options must be single lines, got {line!r}')
  # Values that land in #SBATCH lines, which sbatch splits at whitespace.
  for name, value in words.items():
    if any(c.isspace() for c in value):
      raise ValueError(f'--{name} must not contain whitespace, got {value!r}')
  if not words['job_name'] or not words['log_dir']:
    raise ValueError('--job_name and --log_dir must not be empty')


def sbatch_script(
  train_args: list[str],
  *,
  nodes: int,
  gpus_per_node: int = 8,
  per: str = 'node',
  job_name: str = 'clm_jax',
  partition: str = '',
  time: str = '',
  account: str = '',
  log_dir: str = 'logs',
  port: int = 0,
  array: str = '',
  command: str = 'train',
  extra_sbatch: tuple[str, ...] = (),
  workdir_root: str = '',
) -> str:
  """The text of an sbatch script running `python -m launch <command> <train_args>`.

  Args:
    train_args: Arguments after the command, e.g. `['--config=configs/x.py']`. Each is
      quoted for the shell, except that `$SLURM_*` references (such as
      `--trial=$SLURM_ARRAY_TASK_ID`) stay expandable and take each task's value.
    nodes: Nodes to allocate.
    gpus_per_node: GPUs on each node.
    per: 'node': one process per node owning all its GPUs; 'gpu': one process per GPU,
      told its GPU with `--local_device_ids`.
    job_name: Slurm job name; also names the log files.
    partition: Slurm partition; the cluster default if empty.
    time: Time limit (e.g. '2-00:00:00'); the partition default if empty.
    account: Account to charge; the user's default if empty.
    log_dir: Directory of the batch log and the per-task logs, relative to the run
      directory. It must exist when sbatch runs: Slurm opens the batch log before the
      script starts.
    port: Coordinator port; 0 derives one from the job id.
    array: A job array spec (e.g. '0-3'); each array task is a separate job.
    command: The launch command, 'train' or 'sweep'.
    extra_sbatch: More `#SBATCH` options, e.g. `('--qos=high',)`.
    workdir_root: Directory the job runs in; relative paths in `train_args` and `log_dir`
      resolve against it. Empty: the directory sbatch was run from.

  Returns:
    The script, starting with `#!/bin/bash`.

  Raises:
    ValueError: An argument is out of range; the message names the flag.
  """
  train_args = list(train_args)
  _validate(
    train_args,
    nodes=nodes,
    gpus_per_node=gpus_per_node,
    per=per,
    port=port,
    command=command,
    extra_sbatch=extra_sbatch,
    job_name=job_name,
    partition=partition,
    time=time,
    account=account,
    log_dir=log_dir,
    array=array,
    workdir_root=workdir_root,
  )

  tasks_per_node = 1 if per == 'node' else gpus_per_node
  # %A_%a (array job id, task index) keeps array tasks apart; %j is unique otherwise.
  job_pattern = '%A_%a' if array else '%j'
  log_dir = log_dir.rstrip('/') or '/'
  layout = (
    f'one process per node owning its {gpus_per_node} GPU(s)'
    if per == 'node'
    else f'one process per GPU ({gpus_per_node} per node)'
  )

  sbatch = [
    f'--job-name={job_name}',
    f'--nodes={nodes}',
    f'--ntasks-per-node={tasks_per_node}',
    f'--gpus-per-node={gpus_per_node}',
    '--exclusive',
    '--mem=0',
  ]
  optional = {'partition': partition, 'time': time, 'account': account, 'chdir': workdir_root}
  sbatch += [f'--{name}={value}' for name, value in optional.items() if value]
  sbatch += [
    '--requeue',
    f'--signal=B:USR1@{WARNING_SECONDS}',
    '--open-mode=append',
    f'--output={log_dir}/%x-{job_pattern}.out',
  ]
  if array:
    sbatch.append(f'--array={array}')
  sbatch += [line.removeprefix('#SBATCH').strip() for line in extra_sbatch]

  inner = [' '.join(['exec python -m launch', *map(shlex.quote, command.split())])]
  inner += [_quote(arg) for arg in train_args]
  inner += [
    '--coordinator_address="$JAX_COORDINATOR_ADDRESS"',
    '--num_processes="$SLURM_NTASKS"',
    '--process_id="$SLURM_PROCID"',
  ]
  if per == 'gpu':
    inner.append('--local_device_ids="$SLURM_LOCALID"')
  task_command = shlex.quote(' \\\n    '.join(inner))
  run_dir = shlex.quote(workdir_root) if workdir_root else '"$SLURM_SUBMIT_DIR"'
  port_line = (
    f'PORT={port}'
    if port
    else '# Derived from the job id: two jobs sharing a first node get different ports,\n'
    '# and a requeued job (same id) gets the same one.\n'
    'PORT=$((20000 + SLURM_JOB_ID % 20000))'
  )

  lines = [
    '#!/bin/bash',
    f'# python -m launch {command} on {nodes} node(s), {layout}.',
    '# Written by clm_jax.slurm. Submit from the repository root with the virtualenv',
    '# active: sbatch passes the submitting environment to the job, so the script',
    '# activates nothing itself.',
    '#',
    '# --exclusive and --mem=0: whole nodes, all of their cores and memory.',
    '# --requeue: Slurm may requeue the job after a node failure or preemption; the',
    '#   same command then resumes from the latest checkpoint in the workdir.',
    f'# --signal: USR1 to this shell {WARNING_SECONDS} s before the time limit (see the trap).',
    '# --open-mode=append: a requeued job keeps its id, and so its log files; append',
    '#   rather than overwrite the earlier attempts.',
    *(f'#SBATCH {option}' for option in sbatch),
    '',
    'set -euo pipefail',
    '',
    '# Relative paths in the arguments (config, workdir) are relative to this directory.',
    f'cd {run_dir}',
    "# Slurm already opened this script's own log; the per-task logs go here too.",
    f'mkdir -p {shlex.quote(log_dir)}',
    '# Log lines reach the files as they are printed, not when a buffer fills or the',
    '# process is killed.',
    'export PYTHONUNBUFFERED=1',
    '',
    "# Process 0 hosts JAX's coordinator; srun places task 0 on the first node.",
    '# sed reads the whole list, where `head -n 1` could exit first and fail the',
    '# script (SIGPIPE under pipefail).',
    'COORDINATOR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)',
    port_line,
    'export JAX_COORDINATOR_ADDRESS="$COORDINATOR:$PORT"',
    "# An equal share of the node's cores for each task; srun's default is one core each.",
    f'CPUS_PER_TASK=$(( SLURM_CPUS_ON_NODE / {tasks_per_node} ))',
    '',
    'echo "clm_jax: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0})," \\',
    f'  "$SLURM_JOB_NUM_NODES node(s) x {tasks_per_node} task(s) = $SLURM_NTASKS process(es)," \\',
    '  "$CPUS_PER_TASK CPU(s) each, coordinator $JAX_COORDINATOR_ADDRESS"',
    'echo "clm_jax: nodes $SLURM_JOB_NODELIST"',
    '',
    '# USR1 (the time limit is near): one SIGTERM to the step, which srun passes to',
    '# every task; training finishes its step, saves and exits 0. The requeue waits',
    '# until the step has exited, since requeueing a running job kills it.',
    '# TERM (scancel, preemption, the time limit itself): Slurm signals the tasks',
    '# directly, so this shell passes nothing on (a second SIGTERM makes training exit',
    '# without saving); it only keeps waiting, because the job ends when this shell',
    '# exits, and that would kill the tasks mid-save.',
    'REQUEUE=0',
    'STOP_SENT=0',
    'INTERRUPTED=0',
    'SRUN_PID=',
    'on_usr1() {',
    '  INTERRUPTED=1',
    '  REQUEUE=1',
    '  echo "clm_jax: time limit near: stopping training to save; the job requeues after."',
    '  if (( ! STOP_SENT )) && [[ -n $SRUN_PID ]]; then',
    '    STOP_SENT=1',
    '    kill -TERM "$SRUN_PID" 2>/dev/null || true',
    '  fi',
    '}',
    'on_term() {',
    '  INTERRUPTED=1',
    '  echo "clm_jax: SIGTERM: Slurm is stopping the tasks; waiting for them to save."',
    '}',
    'trap on_usr1 USR1',
    'trap on_term TERM',
    '',
    '# In the background, so that this shell can run its traps while srun runs.',
    '# --kill-on-bad-exit: one failed task ends the step instead of leaving the',
    '# others blocked in a collective. %t in the log name is the task id.',
    'srun \\',
    f'  --ntasks-per-node={tasks_per_node} \\',
    '  --cpus-per-task="$CPUS_PER_TASK" \\',
    '  --kill-on-bad-exit=1 \\',
    '  --open-mode=append \\',
    f'  --output={shlex.quote(f"{log_dir}/%x-{job_pattern}-%t.log")} \\',
    f'  bash -c {task_command} &',
    'SRUN_PID=$!',
    '',
    '# A trap makes `wait` return early; wait again until srun itself has exited',
    "# (bash keeps a finished child's status for the next `wait`).",
    'while true; do',
    '  INTERRUPTED=0',
    '  STATUS=0',
    '  wait "$SRUN_PID" || STATUS=$?',
    '  (( INTERRUPTED )) || break',
    'done',
    '',
    'if (( REQUEUE )); then',
    '  echo "clm_jax: training exited with status $STATUS; requeueing job $SLURM_JOB_ID."',
    '  scontrol requeue "$SLURM_JOB_ID"',
    '  exit 0',
    'fi',
    'echo "clm_jax: training exited with status $STATUS."',
    'exit "$STATUS"',
  ]
  return '\n'.join(lines) + '\n'


def write_sbatch(path, text) -> pathlib.Path:
  """Writes an sbatch script as an executable file, creating its directory.

  Args:
    path: Where to write (str or path-like).
    text: The script, from `sbatch_script`.

  Returns:
    The path written.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  path.chmod(0o755)
  return path
