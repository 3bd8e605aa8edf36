"""SIGTERM / SIGINT as a request to stop cleanly: finish the step, save, exit 0.

Clusters preempt with SIGTERM and a grace period; a user stops with Ctrl-C.
The first signal only sets a flag that the loop reads between steps; a
second one exits the process at once (the last finished checkpoint stays).
With several processes the flag is agreed on by all of them, so they stop
at the same step and save together.
"""

import os
import signal
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT)


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

  def requested(self) -> bool:
    """Whether any process was asked to stop (a collective when there are several)."""
    local = self._signal is not None
    if jax.process_count() == 1:
      return local
    return bool(np.any(multihost_utils.process_allgather(np.array(local))))
