"""The per-step cost of agreeing on a stop request across processes.

Every step, every process of a multi-host run asks whether any process was
signalled (preemption). clm_jax answers through the distributed runtime's
key-value store and a barrier, host to host; the obvious alternative is a
device all-gather (multihost_utils.process_allgather), which also waits for
the step in flight. This runs N processes on 127.0.0.1 and times both, with
and without a train-step-like computation in flight.

  python benchmarks/multihost_bench.py --processes=2 --calls=200
"""

import argparse
import os
import statistics
import subprocess
import sys
import time


def _child(args):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.experimental import multihost_utils

  from clm_jax.parallel import distributed
  from clm_jax.train import preemption

  layout = distributed.resolve(args.coordinator, args.processes, args.process_id, environ={})
  distributed.initialize(layout, heartbeat_timeout=30, init_timeout=60)
  work = jax.jit(lambda x: jnp.tanh(x @ x) @ x)
  x = jnp.ones((args.matrix, args.matrix), jnp.float32)
  work(x).block_until_ready()
  stop = preemption.StopRequest()

  def timed(check, busy):
    times = []
    for i in range(args.calls):
      if busy:
        y = work(x)  # Dispatched, not waited for: a step in flight.
      t = time.perf_counter()
      check(i)
      times.append(time.perf_counter() - t)
      if busy:
        y.block_until_ready()
    return statistics.median(times) * 1e3

  results = {}
  for busy in (False, True):
    kv = timed(lambda i, b=busy: stop.requested(i + 1 + (10**6 if b else 0)), busy)
    gather = timed(lambda i: bool(multihost_utils.process_allgather(np.array(False)).any()), busy)
    results[busy] = (kv, gather)
  if jax.process_index() == 0:
    step_ms = timed(lambda i: None, True)  # Dispatch alone, for scale.
    print(f'{args.processes} processes on 127.0.0.1, {args.calls} calls each, median ms')
    print('| step in flight | KV store + barrier | process_allgather |')
    print('|---|---|---|')
    for busy, (kv, gather) in results.items():
      print(f'| {"yes" if busy else "no"} | {kv:.3f} | {gather:.3f} |')
    print(f'(one {args.matrix}x{args.matrix} step takes {step_ms:.3f} ms to dispatch)')


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--processes', type=int, default=2)
  parser.add_argument('--calls', type=int, default=200)
  parser.add_argument('--matrix', type=int, default=512)
  parser.add_argument('--coordinator')
  parser.add_argument('--process_id', type=int)
  args = parser.parse_args()
  if args.process_id is not None:
    return _child(args)
  from clm_jax.cluster import spawn

  address = f'127.0.0.1:{spawn.free_port()}'
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  env.pop('XLA_FLAGS', None)
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        __file__,
        f'--processes={args.processes}',
        f'--calls={args.calls}',
        f'--matrix={args.matrix}',
        f'--coordinator={address}',
        f'--process_id={i}',
      ],
      env=env,
    )
    for i in range(args.processes)
  ]
  sys.exit(max(p.wait() for p in procs))


if __name__ == '__main__':
  main()
