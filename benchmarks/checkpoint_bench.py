"""Checkpoint speed: async save (blocking part and total), restore, against the raw disk.

Builds a train state of about 1.2 GB (params and both Adam moments, fp32) on
one CPU device, then in one run measures:

  - the disk's raw sequential write (and re-read) speed: 1 GiB in 64 MiB
    writes plus fsync, in the same directory the checkpoints go to;
  - `Checkpointer.save`: the time the training loop is blocked (the call
    returns once the arrays are copied to host memory) and the time until
    the checkpoint is complete on disk;
  - `Checkpointer.restore_latest` into the same shardings.

  python benchmarks/checkpoint_bench.py [--dir=/tmp] [--repeats=3]
"""

import os
import statistics
import tempfile
import time

import grain
import jax
from absl import app
from absl import flags

from clm_jax.ckpt import checkpoint
from clm_jax.config import schema
from clm_jax.parallel import sharding
from clm_jax.train import step as step_lib

_DIR = flags.DEFINE_string('dir', None, 'Where to write; default the system temp dir.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Saves and restores timed; medians shown.')


def _config():
  c = schema.get_config()
  c.model.update(
    vocab_size=32000,
    d_model=768,
    num_layers=8,
    num_heads=12,
    num_kv_heads=4,
    mlp_dim=2048,
    dtype='float32',
  )
  c.mesh.update(data=1)
  c.checkpoint.update(keep=2)
  return c


def _raw_disk(directory) -> tuple[float, float]:
  block = os.urandom(64 << 20)
  path = os.path.join(directory, 'raw.bin')
  start = time.perf_counter()
  with open(path, 'wb') as f:
    for _ in range(16):
      f.write(block)
    f.flush()
    os.fsync(f.fileno())
  write = 1.0 / (time.perf_counter() - start)
  start = time.perf_counter()
  with open(path, 'rb') as f:
    while f.read(64 << 20):
      pass
  read = 1.0 / (time.perf_counter() - start)
  os.remove(path)
  return write * 1.074, read * 1.074  # GiB/s -> GB/s


def main(argv):
  del argv
  c = _config()
  mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
  s = step_lib.setup(c, mesh)
  with tempfile.TemporaryDirectory(dir=_DIR.value) as tmp, jax.set_mesh(mesh):
    state = s.init_state(jax.random.key(0))
    jax.block_until_ready(state)
    gb = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)) / 1e9
    write, read = _raw_disk(tmp)
    tokenizer = os.path.join(tmp, 'tok.model')
    with open(tokenizer, 'wb') as f:
      f.write(b'\0' * 300_000)  # About a 32k-piece sentencepiece model.
    data_it = iter(grain.MapDataset.range(10).to_iter_dataset())
    ckpt = checkpoint.Checkpointer(tmp, c.checkpoint)
    blocked, total, restored = [], [], []
    for step in range(1, _REPEATS.value + 1):
      start = time.perf_counter()
      ckpt.save(step, state, data_it, config=c.to_dict(), tokenizer_path=tokenizer, loop={})
      blocked.append(time.perf_counter() - start)
      ckpt.wait()
      total.append(time.perf_counter() - start)
      abstract = jax.eval_shape(s.init_state, jax.random.key(0))
      start = time.perf_counter()
      _, got, _ = ckpt.restore_latest(abstract, data_it)
      jax.block_until_ready(got)
      restored.append(time.perf_counter() - start)
    ckpt.close()
  print(f'state: {gb:.2f} GB on {jax.devices()[0].device_kind}')
  print(f'raw disk: write {write:.2f} GB/s (fsync), re-read {read:.2f} GB/s (page cache)')
  print(
    f'save: loop blocked {statistics.median(blocked):.2f} s; complete after '
    f'{statistics.median(total):.2f} s = {gb / statistics.median(total):.2f} GB/s'
  )
  print(
    f'restore: {statistics.median(restored):.2f} s = {gb / statistics.median(restored):.2f} GB/s'
  )


if __name__ == '__main__':
  app.run(main)
