"""`slurm` and `sweep`: sbatch scripts for a config, and config-file sweeps."""

import pathlib
import sys

from absl import flags

from launch import common
from launch import training

_NODES = flags.DEFINE_integer('nodes', 1, 'slurm: nodes.')
_GPUS_PER_NODE = flags.DEFINE_integer('gpus_per_node', 8, 'slurm: GPUs per node.')
_PER = flags.DEFINE_enum('per', 'node', ['node', 'gpu'], 'slurm: one process per node or GPU.')
_PARTITION = flags.DEFINE_string('partition', '', 'slurm: partition; default the cluster default.')
_TIME = flags.DEFINE_string('time', '', 'slurm: time limit (e.g. 48:00:00); requeued when hit.')
_ACCOUNT = flags.DEFINE_string('account', '', 'slurm: account to charge.')
_LOG_DIR = flags.DEFINE_string('slurm_logs', 'logs', 'slurm: directory of the per-node logs.')
# Flags of the script itself, not of the training it runs.
_SLURM_ONLY = ('nodes', 'gpus_per_node', 'per', 'partition', 'time', 'account', 'slurm_logs')
# sweep: its --config names a sweep file, read as --sweep_file (__main__._parse).
_SWEEP_FILE = flags.DEFINE_string('sweep_file', None, 'sweep: the sweep file (given as --config).')
_TRIAL = flags.DEFINE_integer('trial', None, 'sweep: run only this trial (a SLURM array task).')
_SLURM = flags.DEFINE_bool('slurm', False, 'sweep: write a SLURM job array instead of running.')


def _allocation() -> dict:
  return dict(
    nodes=_NODES.value,
    gpus_per_node=_GPUS_PER_NODE.value,
    per=_PER.value,
    partition=_PARTITION.value,
    time=_TIME.value,
    account=_ACCOUNT.value,
    log_dir=_LOG_DIR.value,
  )


def _write(default_path: str, text: str, what: str) -> None:
  from clm_jax.cluster import slurm

  path = slurm.write_sbatch(common.OUTPUT.value or default_path, text)
  # Slurm opens the job's log before the script runs: the directory must exist.
  pathlib.Path(_LOG_DIR.value).mkdir(parents=True, exist_ok=True)
  print(f'Wrote {path}: {what}. Submit with:')
  print(f'  sbatch {path}')


def slurm():
  from clm_jax.cluster import slurm as slurm_lib

  args = list(sys.argv[1:])
  args.remove('slurm')
  args = common.without(args, (*_SLURM_ONLY, 'output'))
  if not any(a.startswith('--config=') for a in args):
    args.insert(0, f'--config={flags.FLAGS["config"].config_filename}')
  workdir = common.workdir()
  if not common.WORKDIR.value:
    args.append(f'--workdir={workdir}')
  text = slurm_lib.sbatch_script(args, job_name=workdir.name, **_allocation())
  _write(f'slurm/{workdir.name}.sbatch', text, f'{_NODES.value} x {_GPUS_PER_NODE.value} GPUs')


def sweep():
  from clm_jax.cluster import sweep as sweep_lib
  from clm_jax.cluster import trials

  common.need('sweep_file')
  path = _SWEEP_FILE.value
  if _SLURM.value:
    loaded = sweep_lib.load(path)
    workdir = common.WORKDIR.value or trials.default_workdir(loaded)
    text = trials.slurm_script(loaded, path, workdir, **_allocation())
    _write(f'slurm/sweep-{loaded.name}.sbatch', text, f'a job array of {len(loaded.trials)} trials')
    return
  # A multi-host trial: every process runs the sweep, each trial's train joins them.
  dist = [
    f'--{name}={",".join(map(str, value)) if isinstance(value, list) else value}'
    for name in training.DISTRIBUTED_FLAGS
    if (value := flags.FLAGS[name].value) is not None
  ]
  process_id = flags.FLAGS.process_id or 0
  sys.exit(
    trials.main(path, common.WORKDIR.value, _TRIAL.value, extra_args=dist, process_id=process_id)
  )


COMMANDS = {'slurm': slurm, 'sweep': sweep}
