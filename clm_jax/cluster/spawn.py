"""Several training processes on this machine, joined over 127.0.0.1 (`--spawn=N`).

The way to try a multi-host setup on a laptop, and how the tests exercise it.
Signals are forwarded to every process; after one fails the others get `grace`
seconds, then are killed, so nothing outlives a failed run.
"""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from absl import logging


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on right now."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _pump(stream, prefix: str, out) -> None:
  for line in stream:
    out.write(prefix + line)
    out.flush()


def exit_code(returncode: int) -> int:
  """A shell's view of a child's status: 128 + N for death by signal N."""
  return 128 - returncode if returncode < 0 else returncode


def run(
  args: Sequence[str],
  num_processes: int,
  *,
  grace: float,
  env: dict[str, str] | None = None,
  devices_per_process: Sequence[Sequence[int]] | None = None,
) -> int:
  """Runs `python -m launch *args` as `num_processes` joined processes.

  `devices_per_process`: local GPU ids of each; default all (CPU devices are
  never shared). Returns 0, or the first failure's exit code.
  """
  port = free_port()
  procs = []
  for i in range(num_processes):
    cmd = [
      sys.executable,
      '-m',
      'launch',
      *args,
      f'--coordinator_address=127.0.0.1:{port}',
      f'--num_processes={num_processes}',
      f'--process_id={i}',
    ]
    if devices_per_process:
      cmd.append(f'--local_device_ids={",".join(map(str, devices_per_process[i]))}')
    procs.append(
      subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ if env is None else env, PYTHONUNBUFFERED='1'),
      )
    )
  logging.info('spawned %d processes, coordinator 127.0.0.1:%d', num_processes, port)
  pumps = [
    threading.Thread(target=_pump, args=(p.stdout, f'[process {i}] ', sys.stdout), daemon=True)
    for i, p in enumerate(procs)
  ]
  for t in pumps:
    t.start()

  def forward(signum, frame):
    del frame
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)

  previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    first_failure, deadline = None, None
    while any(p.poll() is None for p in procs):
      for i, p in enumerate(procs):
        if first_failure is None and p.returncode not in (None, 0):
          first_failure = (i, exit_code(p.returncode))
          deadline = time.monotonic() + grace
          print(
            f'process {i} exited with status {first_failure[1]}; the others get {grace:.0f} s '
            'to stop',
            file=sys.stderr,
            flush=True,
          )
      if deadline is not None and time.monotonic() > deadline:
        for i, p in enumerate(procs):
          if p.poll() is None:
            print(f'process {i} still running: killing it', file=sys.stderr, flush=True)
            p.kill()
      time.sleep(0.2)
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
    for t in pumps:
      t.join(timeout=5)
  if first_failure is None:
    failed = [(i, exit_code(p.returncode)) for i, p in enumerate(procs) if p.returncode]
    first_failure = failed[0] if failed else None
  return 0 if first_failure is None else first_failure[1]
