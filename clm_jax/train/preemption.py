"""SIGTERM / SIGINT as a request to stop cleanly: finish the step, save, exit 0.

A second signal exits at once. Processes agree on the flag every step through
the distributed runtime's key-value store and a host barrier (the devices never
wait), so all stop and save at the same step.
"""

import os
import signal
import sys

import jax
from jax._src import distributed as jax_distributed

SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Processes run in step with one another; a slower one is a hang, which the
# runtime's heartbeats end well before this.
BARRIER_TIMEOUT_MS = 30 * 60 * 1000


class StopRequest:
  """Catches SIGTERM and SIGINT while active (a context manager)."""

  def __init__(self):
    self._signal = None
    self._previous = {}

  def __enter__(self):
    for signum in SIGNALS:
      self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    return False

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if self._signal is not None:
      print(f'{name} again: exiting now; the last finished checkpoint stays.', file=sys.stderr)
      sys.stderr.flush()
      os._exit(128 + signum)
    self._signal = signum
    print(f'{name}: finishing this step, saving, then exiting.', file=sys.stderr, flush=True)

  @property
  def signal_name(self) -> str | None:
    return None if self._signal is None else signal.Signals(self._signal).name

  @property
  def reason(self) -> str:
    """What asked for the stop: this process's signal, or another process."""
    return self.signal_name or 'a stop request from another process'

  def requested(self, step: int) -> bool:
    """Whether any process was asked to stop; every process calls this at every step."""
    local = self._signal is not None
    if jax.process_count() == 1:
      return local
    # jax.distributed's client; Orbax reaches it the same way, as JAX has no public handle.
    client = jax_distributed.global_state.client
    key = f'clm_jax/stop/{step}'
    client.key_value_set(f'{key}/{jax.process_index()}', str(int(local)))
    # Every process has posted its flag for `step` once all are past the barrier.
    client.wait_at_barrier(f'clm_jax/stop_barrier/{step}', BARRIER_TIMEOUT_MS)
    flags = [value for _, value in client.key_value_dir_get(key)]
    if step > 1:
      # Everyone read step-1's flags before reaching this barrier.
      client.key_value_delete(f'clm_jax/stop/{step - 1}/{jax.process_index()}')
    return '1' in flags
