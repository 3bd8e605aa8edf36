"""`train`: join the distributed runtime (or spawn local processes), then run the loop."""

import os
import sys

from absl import app
from absl import flags
from absl import logging

from launch import common

# clm_jax/parallel/distributed.py says where the layout comes from.
_COORDINATOR = flags.DEFINE_string(
  'coordinator_address', None, 'HOST:PORT of process 0; else $JAX_COORDINATOR_ADDRESS or SLURM/MPI.'
)
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, in [0, num_processes).')
_LOCAL_DEVICE_IDS = flags.DEFINE_list(
  'local_device_ids', None, 'GPUs this process drives (one process per GPU); default all.'
)
_HEARTBEAT = flags.DEFINE_integer(
  'heartbeat_timeout', 100, 'Seconds of silence after which a process counts as lost.'
)
_INIT_TIMEOUT = flags.DEFINE_integer(
  'init_timeout', 300, 'Seconds to wait for every process to join.'
)
_SPAWN = flags.DEFINE_integer(
  'spawn', 0, 'Run this many processes on this machine, joined over 127.0.0.1.'
)
_GPU_DEFAULTS = flags.DEFINE_bool(
  'gpu_defaults', True, 'On GPUs, set the XLA / NCCL defaults of clm_jax/parallel/gpu_env.py.'
)
_RESTART = flags.DEFINE_bool(
  'restart_from_scratch',
  False,
  'When every checkpoint in --workdir is damaged, train from step 0 instead of stopping '
  '(the damaged ones are kept as checkpoints/<step>.damaged). An intact checkpoint still resumes.',
)
DISTRIBUTED_FLAGS = ('coordinator_address', 'num_processes', 'process_id', 'local_device_ids')


def _split_gpus(processes: int) -> list[list[int]] | None:
  """This machine's GPUs in equal blocks, one per spawned process; None on CPU."""
  from clm_jax.parallel import gpu_env

  count = gpu_env.gpu_count()
  if not count:
    return None  # Each CPU process has its own (--xla_force_host_platform_device_count).
  if count % processes:
    raise app.UsageError(f'--spawn={processes} does not divide the {count} GPUs.')
  k = count // processes
  return [list(range(i * k, (i + 1) * k)) for i in range(processes)]


def train():
  from clm_jax.parallel import gpu_env

  if _GPU_DEFAULTS.value and gpu_env.gpu_present():
    # Before any JAX backend starts: XLA reads its flags once, at start-up.
    if changed := gpu_env.apply(os.environ):
      logging.info('GPU defaults: %s', ' '.join(f'{k}={v}' for k, v in changed.items()))
  if _SPAWN.value:
    from clm_jax.cluster import spawn

    sys.exit(
      spawn.run(
        common.without(sys.argv[1:], ('spawn',)),
        _SPAWN.value,
        # The others notice a lost process within a heartbeat; then they are ended.
        grace=_HEARTBEAT.value + 30,
        devices_per_process=_split_gpus(_SPAWN.value),
      )
    )
  from clm_jax.parallel import distributed

  layout = distributed.resolve(
    _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _LOCAL_DEVICE_IDS.value
  )
  distributed.initialize(
    layout, heartbeat_timeout=_HEARTBEAT.value, init_timeout=_INIT_TIMEOUT.value
  )
  from clm_jax.eval import tasks
  from clm_jax.plan import hooks as plan_hooks
  from clm_jax.train import loop

  loop.run(
    flags.FLAGS.config,
    common.workdir(),
    hooks=[plan_hooks.MemoryEstimate(), tasks.CodeEval()],
    restart_from_scratch=_RESTART.value,
  )


COMMANDS = {'train': train}
