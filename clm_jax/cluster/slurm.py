"""Writes sbatch scripts that run `python -m launch train` across Slurm nodes.

The script is the template `sbatch.sh` next to this module, a bash script that
ShellCheck can check, with its placeholders filled in (`_render`). It starts
one srun step whose tasks each run one training process: one per node owning
all of the node's GPUs (`per='node'`), or one per GPU (`per='gpu'`). Every
process is told the coordinator (the first node), the process count and its
own id as explicit flags, so nothing depends on JAX detecting Slurm by itself.

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

# The script, with placeholders that `sbatch_script` fills in; see `_render`.
TEMPLATE = pathlib.Path(__file__).with_name('sbatch.sh')
# `#@NAME@` as a whole line, or `@NAME@` anywhere.
_PLACEHOLDER = re.compile(r'^#@([A-Z][A-Z0-9_]*)@$|@([A-Z][A-Z0-9_]*)@', re.MULTILINE)


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

  return _render(
    TEMPLATE.read_text(),
    HEADER=f'# python -m launch {command} on {nodes} node(s), {layout}.',
    WARNING_SECONDS=str(WARNING_SECONDS),
    SBATCH_LINES='\n'.join(f'#SBATCH {option}' for option in sbatch),
    RUN_DIR=shlex.quote(workdir_root) if workdir_root else '"$SLURM_SUBMIT_DIR"',
    LOG_DIR=shlex.quote(log_dir),
    TASKS_PER_NODE=str(tasks_per_node),
    PORT=str(port),
    TASK_LOG=shlex.quote(f'{log_dir}/%x-{job_pattern}-%t.log'),
    TASK_COMMAND=shlex.quote(' \\\n    '.join(inner)),
  )


def _render(template: str, **values: str) -> str:
  """`template` with each placeholder replaced by its value from `values`.

  A placeholder is `@NAME@`; a line that is only `#@NAME@` (a comment, so that
  the template stays valid shell) is replaced whole. The values are not scanned
  again, so an `@` in an argument is left as it is.

  Raises:
    RuntimeError: The template has a placeholder with no value, or a value
      has no placeholder.
  """
  used = set()

  def fill(match):
    name = match.group(1) or match.group(2)
    if name not in values:
      raise RuntimeError(f'{TEMPLATE.name}: no value for the placeholder @{name}@')
    used.add(name)
    return values[name]

  text = _PLACEHOLDER.sub(fill, template)
  if unused := sorted(values.keys() - used):
    raise RuntimeError(f'{TEMPLATE.name}: no placeholder for {unused}')
  return text


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
