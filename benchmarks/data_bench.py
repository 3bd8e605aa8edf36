"""Data-side throughput: prepare, stream prepared shards, tokenize + FIM + pack on the fly.

On the Python standard library (a real code corpus on every machine), with
the default config's tokenizer, into 8192-token rows:

  1. `data prepare` (read, filter, exact + near dedup, tokenize): MB/s of input.
  2. Streaming the prepared ArrayRecord shards into packed rows in this one
     process (data.workers=0): tokens/s.
  3. Raw files tokenized on the fly, FIM at rate 0.9, packed: tokens/s, once
     in this process (sentencepiece releases the GIL, so the streams' reader
     threads share the cores) and once in --workers Grain worker processes.

Each streaming figure is the median of --repeats timed windows of --seconds.

  python benchmarks/data_bench.py [--workers=2] [--seconds=10] [--repeats=3]
"""

import statistics
import tempfile
import time

from absl import app
from absl import flags

from clm_jax.data import loader
from clm_jax.data import prepare
from clm_jax.data import sources
from clm_jax.data import tokenizer as tokenizer_lib
from configs import default

_WORKERS = flags.DEFINE_integer('workers', 2, 'Processes for prepare and on-the-fly streaming.')
_SECONDS = flags.DEFINE_float('seconds', 10, 'Length of one timed window.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed windows per figure; the median is shown.')
_SEQ_LEN = flags.DEFINE_integer('seq_len', 8192, 'Tokens per packed row.')
_BATCH = flags.DEFINE_integer('batch', 8, 'Rows per batch.')


def _tokens_per_second(c_data, tok) -> float:
  ds = loader.make_dataset(
    c_data, tok, seq_len=_SEQ_LEN.value, batch_size=_BATCH.value, split='train', seed=0
  )
  it = iter(ds)
  try:
    for _ in range(3):  # Start-up: worker processes, first reads.
      next(it)
    rates = []
    for _ in range(_REPEATS.value):
      tokens, start = 0, time.perf_counter()
      while time.perf_counter() - start < _SECONDS.value:
        batch = next(it)
        tokens += int((batch['segment_ids'] > 0).sum())
      rates.append(tokens / (time.perf_counter() - start))
    return statistics.median(rates)
  finally:
    it.close()


def main(argv):
  del argv
  c = default.get_config()
  tok = tokenizer_lib.for_corpus(c.data, c.model.vocab_size)
  root = sources.corpus_root(c.data)
  with tempfile.TemporaryDirectory() as tmp:
    start = time.perf_counter()
    manifest = prepare.prepare(
      [str(root)],
      f'{tmp}/stdlib',
      tok.path,
      prepare.PrepareOptions(languages=('python',)),
      workers=_WORKERS.value,
      progress=False,
    )
    seconds = time.perf_counter() - start
    mb = manifest['bytes_read'] / 2**20
    print(f'prepare: {mb:.1f} MB of python in {seconds:.1f}s = {mb / seconds:.2f} MB/s')

    c.data.source, c.data.path = 'prepared', f'{tmp}/stdlib'
    rate = _tokens_per_second(c.data, tok)
    print(f'stream prepared, 1 process: {rate / 1e6:.2f}M tokens/s')

  for workers in (0, _WORKERS.value):
    c = default.get_config()
    c.data.fim_rate = 0.9
    c.data.workers = workers
    rate = _tokens_per_second(c.data, tok)
    where = f'{workers} worker processes' if workers else 'in-process reader threads'
    print(f'raw: tokenize + FIM 0.9 + pack, {where}: {rate / 1e3:.0f}k tokens/s')


if __name__ == '__main__':
  app.run(main)
