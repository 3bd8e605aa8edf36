"""Joining the JAX distributed runtime: one process per host (or per GPU).

The layout comes from flags, else JAX_* environment variables, else a SLURM
step or Open MPI job (detected by jax.distributed), else one process. A lost
process (no heartbeat for `heartbeat_timeout` s) ends the run everywhere, to
restart from the last checkpoint like any crash; nothing waits forever.
"""

import dataclasses
import os
from collections.abc import Mapping
from collections.abc import Sequence

import jax
from absl import logging

# Set by a SLURM step with several tasks / by mpirun.
_SLURM = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID')
_MPI = ('OMPI_COMM_WORLD_SIZE', 'OMPI_COMM_WORLD_RANK')


class DistributedError(ValueError):
  """An inconsistent multi-process layout (flags or environment)."""


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where this process sits; None fields are left to the cluster's detection."""

  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None
  source: str = 'single'  # 'flags' | 'environment' | 'slurm' | 'mpi' | 'single'

  @property
  def multi_process(self) -> bool:
    return self.source != 'single'


def _int_or_none(value) -> int | None:
  return None if value in (None, '') else int(value)


def _ids(value) -> tuple[int, ...] | None:
  if value in (None, '', []):
    return None
  if isinstance(value, str):
    value = value.split(',')
  return tuple(int(v) for v in value)


def resolve(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  local_device_ids: Sequence[int] | str | None = None,
  environ: Mapping[str, str] = os.environ,
) -> Layout:
  """Works out the layout from flags, then the environment, then the cluster.

  Raises DistributedError for a layout given in part or out of range.
  """
  flagged = (coordinator_address, num_processes, process_id, local_device_ids)
  # Each setting from its flag, else from its environment variable.
  given = Layout(
    coordinator_address or environ.get('JAX_COORDINATOR_ADDRESS') or None,
    _int_or_none(num_processes if num_processes is not None else environ.get('JAX_NUM_PROCESSES')),
    _int_or_none(process_id if process_id is not None else environ.get('JAX_PROCESS_ID')),
    _ids(local_device_ids) or _ids(environ.get('JAX_LOCAL_DEVICE_IDS')),
    'flags' if any(v not in (None, '', []) for v in flagged) else 'environment',
  )
  if given.coordinator_address is None and given.num_processes is None:
    if given.process_id is not None:
      raise DistributedError(
        f'--process_id={given.process_id} needs --num_processes and --coordinator_address.'
      )
    if all(k in environ for k in _SLURM) and int(environ['SLURM_NTASKS']) > 1:
      return Layout(local_device_ids=given.local_device_ids, source='slurm')
    if all(k in environ for k in _MPI) and int(environ['OMPI_COMM_WORLD_SIZE']) > 1:
      return Layout(local_device_ids=given.local_device_ids, source='mpi')
    return Layout(local_device_ids=given.local_device_ids)
  n, i = given.num_processes, given.process_id
  if n is None or i is None or given.coordinator_address is None:
    raise DistributedError(
      'a multi-process run needs all of --coordinator_address=HOST:PORT, '
      f'--num_processes and --process_id (from {given.source}); got '
      f'coordinator_address={given.coordinator_address}, num_processes={n}, process_id={i}.'
    )
  if n < 1 or not 0 <= i < n:
    raise DistributedError(f'--process_id={i} is not in [0, --num_processes={n}).')
  if ':' not in given.coordinator_address:
    raise DistributedError(
      f'--coordinator_address={given.coordinator_address!r} must be HOST:PORT.'
    )
  if n == 1:
    return Layout(local_device_ids=given.local_device_ids)
  return given


def initialize(layout: Layout, *, heartbeat_timeout: int = 100, init_timeout: int = 300) -> None:
  """Joins the distributed runtime as `layout` says, before anything touches a device.

  Timeouts are in seconds; `init_timeout` bounds the wait for every process to join.
  """
  if not layout.multi_process:
    if layout.local_device_ids is not None:
      jax.config.update('jax_cuda_visible_devices', ','.join(map(str, layout.local_device_ids)))
    return
  # Cross-process collectives on CPU devices need an implementation; GPUs use NCCL.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(
    coordinator_address=layout.coordinator_address,
    num_processes=layout.num_processes,
    process_id=layout.process_id,
    local_device_ids=list(layout.local_device_ids) if layout.local_device_ids else None,
    initialization_timeout=init_timeout,
    heartbeat_timeout_seconds=heartbeat_timeout,
  )
  logging.info(
    'process %d of %d (%s), coordinator %s: %d local of %d devices',
    jax.process_index(),
    jax.process_count(),
    layout.source,
    layout.coordinator_address or 'detected',
    jax.local_device_count(),
    jax.device_count(),
  )
