"""Pipeline schedule: bubble fractions, and step time pipelined vs not on fake devices.

1. The bubble (P - 1) / (R K + P - 1) of the original layout (4 stages, 16
   micro-batches) for several virtual-stage counts, from the schedule itself.
2. The median train-step time of one small model on 8 fake CPU devices
   under several (data, tensor, pipeline, virtual) layouts. The 8 devices
   share this machine's cores, so this measures the schedule's overhead
   (bubble iterations run, rematerialisation, collective-permutes), not a
   speed-up; the ratio to the unpipelined layout is what to read.

  python benchmarks/pipeline_bench.py [--steps=5]
"""

import os

os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
)

import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from clm_jax.config import schema  # noqa: E402
from clm_jax.parallel import sharding  # noqa: E402
from clm_jax.train import pipeline  # noqa: E402
from clm_jax.train import step as step_lib  # noqa: E402

_STEPS = flags.DEFINE_integer('steps', 5, 'Timed steps per layout (after one warm-up).')
LAYOUTS = [(8, 1, 1, 1), (2, 1, 4, 1), (2, 1, 4, 2), (1, 1, 8, 1), (2, 2, 2, 2)]


def _config():
  c = schema.get_config()
  c.model.update(
    vocab_size=4096,
    d_model=256,
    num_layers=8,
    num_heads=4,
    num_kv_heads=2,
    mlp_dim=704,
    max_seq_len=256,
    dtype='float32',
    remat='full',
  )
  c.train.update(seq_len=256, global_batch_size=32, microbatches=8, loss_chunk_len=128)
  return c


def _step_time(data, tensor, stages, virtual):
  c = _config()
  c.mesh.update(data=data, tensor=tensor, pipeline=stages, virtual_stages=virtual)
  mesh = sharding.make_mesh(c.mesh)
  s = step_lib.setup(c, mesh)
  rng = np.random.default_rng(0)
  B, T = c.train.global_batch_size, c.train.seq_len
  batch = {
    'tokens': rng.integers(0, c.model.vocab_size, (B, T)).astype(np.int32),
    'segment_ids': np.ones((B, T), np.int32),
    'positions': np.tile(np.arange(T, dtype=np.int32), (B, 1)),
  }
  with jax.set_mesh(mesh):
    state = s.init_state(jax.random.key(0))
    batch = sharding.host_to_global(batch, mesh)
    state, m = s.train_step(state, batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(_STEPS.value):
      start = time.perf_counter()
      state, m = s.train_step(state, batch)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - start)
  return statistics.median(times), s.pipeline_schedule.bubble


def main(argv):
  del argv
  print('Bubble of 4 stages, 16 micro-batches (the original layout):')
  for virtual in (1, 2, 3, 4):
    schedule = pipeline.Schedule(4, virtual, 16)
    print(f'  virtual_stages={virtual}: {schedule.bubble:.3f} ({schedule.iterations} iterations)')
  print(f'\nTrain step on {jax.device_count()} fake {jax.devices()[0].platform} devices:')
  base_time = None
  for layout in LAYOUTS:
    seconds, bubble = _step_time(*layout)
    base_time = base_time or seconds
    print(
      f'  (data, tensor, pipeline, virtual)={layout}: {seconds:.3f} s '
      f'({seconds / base_time:.2f}x), bubble {bubble:.3f}'
    )


if __name__ == '__main__':
  app.run(main)
