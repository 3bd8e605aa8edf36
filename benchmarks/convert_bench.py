"""Hugging Face conversion speed: clm_jax params -> safetensors -> clm_jax, in MB/s.

Random params of configs/bench_tiny.py's model (or --config) are written with
`hf.save_hf` and read back with `hf.load_hf`, each `--repeats` times into a
fresh directory; prints the median MB/s of each direction (MB of tensors
written or read, in --dtype) as a Markdown table.

  python benchmarks/convert_bench.py [--dtype=bfloat16] [--repeats=3]
"""

import pathlib
import shutil
import statistics
import tempfile
import time

import jax
from absl import app
from absl import flags
from ml_collections import config_flags

from clm_jax import config as config_lib
from clm_jax.ckpt import hf
from clm_jax.model import decoder as model_lib

config_flags.DEFINE_config_file('config', 'configs/bench_tiny.py', 'Config whose model to convert.')
_DTYPE = flags.DEFINE_string('dtype', 'bfloat16', 'Dtype of the written tensors.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed runs per direction; the median is kept.')


def main(argv):
  del argv
  cfg = config_lib.ModelConfig.from_config(flags.FLAGS.config.model)
  params = jax.jit(model_lib.init, static_argnums=0)(cfg, jax.random.key(0))
  jax.block_until_ready(params)
  root = pathlib.Path(tempfile.mkdtemp(prefix='convert_bench_'))
  save, load = [], []
  try:
    for i in range(_REPEATS.value):
      out = root / f'hf{i}'
      start = time.perf_counter()
      hf.save_hf(params, cfg, out, dtype=_DTYPE.value, progress=False)
      save.append(time.perf_counter() - start)
      nbytes = sum(p.stat().st_size for p in out.glob('*.safetensors'))
      start = time.perf_counter()
      _, loaded = hf.load_hf(out, progress=False)
      jax.block_until_ready(loaded)
      load.append(time.perf_counter() - start)
      shutil.rmtree(out)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  mb = nbytes / 1e6
  print(f'{model_lib.param_count(params):,} parameters, {mb:.0f} MB of {_DTYPE.value} safetensors')
  print('| direction | median s | MB/s |')
  print('|---|---|---|')
  for name, times in (('save_hf (to HF)', save), ('load_hf (from HF)', load)):
    t = statistics.median(times)
    print(f'| {name} | {t:.2f} | {mb / t:.0f} |')


if __name__ == '__main__':
  app.run(main)
