"""Running `python -m launch` in a subprocess, as a user would, for the tests."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
# A tiny model on the standard library: seconds per run on one CPU device.
TINY = [
  '--config=configs/default.py',
  '--config.model.vocab_size=512',
  '--config.model.d_model=64',
  '--config.model.num_layers=2',
  '--config.model.mlp_dim=128',
  '--config.train.seq_len=64',
  '--config.train.loss_chunk_len=32',
  '--config.train.global_batch_size=8',
  '--config.train.log_every=5',
  '--config.train.eval_batches=2',
  '--config.optim.warmup_steps=5',
  '--config.optim.peak_lr=0.01',
  '--config.checkpoint.every=10',
  '--config.data.tokenizer_sample_mb=1',
]


def env(cache) -> dict:
  """One CPU device (a user's plain run) and a test-local tokenizer cache."""
  out = {**os.environ, 'CLM_JAX_CACHE': str(cache), 'JAX_PLATFORMS': 'cpu'}
  out.pop('XLA_FLAGS', None)
  return out


def launch(*args, cache, check=True) -> subprocess.CompletedProcess:
  out = subprocess.run(
    [sys.executable, '-m', 'launch', *args],
    capture_output=True,
    text=True,
    cwd=ROOT,
    env=env(cache),
    timeout=600,
  )
  if check:
    assert out.returncode == 0, out.stderr[-4000:]
  return out


def train(workdir, cache, *flags, check=True) -> subprocess.CompletedProcess:
  return launch('train', *TINY, f'--workdir={workdir}', *flags, cache=cache, check=check)


def start_train(workdir, cache, *flags) -> subprocess.Popen:
  """A training run in the background, to signal or kill."""
  return subprocess.Popen(
    [sys.executable, '-m', 'launch', 'train', *TINY, f'--workdir={workdir}', *flags],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    cwd=ROOT,
    env=env(cache),
  )
