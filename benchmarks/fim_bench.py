"""Throughput of fim.maybe_permute: input tokens/s through FIM on one core.

Each pass permutes --files standard-library files, pre-tokenized with the
default config's tokenizer (trained once and cached, as `launch train` does),
at --fim_rate. The figure is the median over --repeats timed windows of at
least --seconds each.

  python benchmarks/fim_bench.py [--fim_rate=0.9] [--seconds=1] [--repeats=5]
"""

import pathlib
import statistics
import sysconfig
import time

import numpy as np
from absl import app
from absl import flags

from clm_jax.data import fim
from clm_jax.data import sources
from clm_jax.data import tokenizer as tokenizer_lib
from configs import default

_FIM_RATE = flags.DEFINE_float('fim_rate', 0.9, 'Share of documents permuted.')
_SECONDS = flags.DEFINE_float('seconds', 1.0, 'Shortest timed window; whole passes only.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed windows; the median is shown.')
_FILES = flags.DEFINE_integer('files', 50, 'Standard-library files per pass (sorted by path).')


def _window(docs, tok, rng) -> float:
  """Input tokens/s over whole passes lasting at least --seconds."""
  total = sum(len(d) for d in docs)
  passes, start = 0, time.perf_counter()
  while passes < 1 or time.perf_counter() - start < _SECONDS.value:
    for doc in docs:
      fim.maybe_permute(doc, rng, tok, fim_rate=_FIM_RATE.value)
    passes += 1
  return passes * total / (time.perf_counter() - start)


def main(argv):
  del argv
  c = default.get_config()
  tok = tokenizer_lib.for_corpus(c.data, c.model.vocab_size)
  paths = sorted(pathlib.Path(sysconfig.get_paths()['stdlib']).glob('*.py'))[: _FILES.value]
  docs = [np.asarray(tok.encode(sources.read_text(p)), np.int32) for p in paths]
  rng = np.random.default_rng(0)
  _window(docs, tok, rng)  # Warm-up.
  rates = [_window(docs, tok, rng) for _ in range(_REPEATS.value)]
  print(
    f'fim.maybe_permute at fim_rate {_FIM_RATE.value}, {len(docs)} files, '
    f'{sum(len(d) for d in docs):,} tokens, {tok.vocab_size}-piece tokenizer: '
    f'median {statistics.median(rates) / 1e6:.2f}M input tokens/s '
    f'(min {min(rates) / 1e6:.2f}M, max {max(rates) / 1e6:.2f}M of {len(rates)})'
  )


if __name__ == '__main__':
  app.run(main)
