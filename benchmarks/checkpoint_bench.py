"""Checkpoint speed: async save (blocking part and total), restore, against the raw disk.

Builds a train state of about 1.2 GB (params and both Adam moments, fp32) on
the first device (JAX_PLATFORMS=cpu for a CPU one), random throughout unless
--fill=init, then in one run measures:

  - the disk's raw sequential write (and re-read) speed: 1 GiB in 64 MiB
    writes plus fsync, in the same directory the checkpoints go to;
  - `Checkpointer.save`: the time the training loop is blocked (the call
    returns once the arrays are copied to host memory) and the time until
    the checkpoint is complete on disk;
  - `Checkpointer.restore_latest` into the same shardings;
  - the CRC-32 checksums within those: `checksums.write` (run by the save
    before its commit) and `checksums.verify` (run by the restore first),
    each timed alone on the saved step and shown as a share of the save.

  python benchmarks/checkpoint_bench.py [--dir=/tmp] [--repeats=3] [--fill=random|init]
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
from clm_jax.ckpt import checksums
from clm_jax.config import schema
from clm_jax.parallel import sharding
from clm_jax.train import step as step_lib

_DIR = flags.DEFINE_string('dir', None, 'Where to write; default the system temp dir.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Saves and restores timed; medians shown.')
_FILL = flags.DEFINE_enum(
  'fill',
  'random',
  ['random', 'init'],
  "The state's values: 'random' everywhere, as after training (nothing for zstd to "
  "compress); 'init', as initialised (Adam's moments zero: a third of the bytes on disk).",
)


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
    if _FILL.value == 'random':
      keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(state))))
      state = jax.tree.map(
        lambda x: (
          jax.random.normal(next(keys), x.shape, x.dtype).astype(x.dtype)
          if jax.numpy.issubdtype(x.dtype, jax.numpy.floating)
          else x
        ),
        state,
      )
    jax.block_until_ready(state)
    gb = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)) / 1e9
    write, read = _raw_disk(tmp)
    tokenizer = os.path.join(tmp, 'tok.model')
    with open(tokenizer, 'wb') as f:
      f.write(b'\0' * 300_000)  # About a 32k-piece sentencepiece model.
    data_it = iter(grain.MapDataset.range(10).to_iter_dataset())
    ckpt = checkpoint.Checkpointer(tmp, c.checkpoint)
    blocked, total, restored, summed, verified, on_disk = [], [], [], [], [], []
    for step in range(1, _REPEATS.value + 1):
      start = time.perf_counter()
      ckpt.save(step, state, data_it, config=c.to_dict(), tokenizer_path=tokenizer, loop={})
      blocked.append(time.perf_counter() - start)
      ckpt.wait()
      total.append(time.perf_counter() - start)
      step_dir = os.path.join(tmp, 'checkpoints', str(step))
      on_disk.append(
        sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(step_dir) for f in fs) / 1e9
      )
      start = time.perf_counter()
      checksums.write(step_dir)  # What the save did before its commit, again.
      summed.append(time.perf_counter() - start)
      start = time.perf_counter()
      assert checksums.verify(step_dir) is None
      verified.append(time.perf_counter() - start)
      abstract = jax.eval_shape(s.init_state, jax.random.key(0))
      start = time.perf_counter()
      _, got, _ = ckpt.restore_latest(abstract, data_it)
      jax.block_until_ready(got)
      restored.append(time.perf_counter() - start)
    ckpt.close()
  print(
    f'state: {gb:.2f} GB ({_FILL.value} values; {statistics.median(on_disk):.2f} GB on disk) '
    f'on {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs'
  )
  print(f'raw disk: write {write:.2f} GB/s (fsync), re-read {read:.2f} GB/s (page cache)')
  print(
    f'save: loop blocked {statistics.median(blocked):.2f} s; complete after '
    f'{statistics.median(total):.2f} s = {gb / statistics.median(total):.2f} GB/s'
  )
  print(
    f'restore: {statistics.median(restored):.2f} s = {gb / statistics.median(restored):.2f} GB/s'
  )
  save, load = statistics.median(total), statistics.median(restored)
  for name, times, within in (('save', summed, save), ('restore', verified, load)):
    t = statistics.median(times)
    print(
      f'checksums at {name}: {t:.2f} s = {100 * t / save:.1f}% of the save '
      f'({100 * t / within:.1f}% of the {name}; {statistics.median(on_disk) / t:.2f} GB/s on '
      f'disk, {checksums.THREADS} threads)'
    )


if __name__ == '__main__':
  app.run(main)
