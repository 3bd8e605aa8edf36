"""Several processes over the JAX distributed runtime on 127.0.0.1, as on a cluster.

Two processes with 4 CPU devices each train the (data=2, tensor=2,
pipeline=2) mesh and must follow the one-process 8-device run; they are
killed and restarted; one of them dies and the other must not outlive it.
"""

import pytest

from clm_jax.parallel import distributed
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


def test_layout_from_flags_then_environment_then_cluster():
  env = {'JAX_COORDINATOR_ADDRESS': 'h:1', 'JAX_NUM_PROCESSES': '4', 'JAX_PROCESS_ID': '3'}
  assert distributed.resolve('a:2', 2, 1, '0,1', environ=env) == distributed.Layout(
    'a:2', 2, 1, (0, 1), 'flags'
  )
  assert distributed.resolve(environ=env) == distributed.Layout('h:1', 4, 3, None, 'environment')
  slurm = {
    'SLURM_JOB_ID': '7',
    'SLURM_STEP_NODELIST': 'n[1-2]',
    'SLURM_NTASKS': '2',
    'SLURM_PROCID': '1',
  }
  assert distributed.resolve(environ=slurm).source == 'slurm'
  assert distributed.resolve(environ={**slurm, 'SLURM_NTASKS': '1'}).source == 'single'
  assert (
    distributed.resolve(environ={'OMPI_COMM_WORLD_SIZE': '8', 'OMPI_COMM_WORLD_RANK': '0'}).source
    == 'mpi'
  )
  assert not distributed.resolve(environ={}).multi_process
  assert not distributed.resolve('a:2', 1, 0, environ={}).multi_process


@pytest.mark.parametrize(
  'args, match',
  [
    (('a:2', 2, None), 'needs all of'),
    ((None, None, 1), '--process_id=1 needs'),
    (('a:2', 2, 2), r'--process_id=2 is not in \[0, --num_processes=2\)'),
    (('a', 2, 0), 'HOST:PORT'),
  ],
)
def test_a_partial_layout_is_a_clear_error(args, match):
  with pytest.raises(distributed.DistributedError, match=match):
    distributed.resolve(*args, environ={})
