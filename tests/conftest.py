"""Every test runs on CPU with 8 fake devices, enough for any mesh up to 2x2x2."""

import os

os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
)
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pytest  # noqa: E402

from clm_jax.config import schema  # noqa: E402


def _tiny_config():
  """A small fp32 model that every mesh up to 8 devices can split."""
  c = schema.get_config()
  c.model.update(
    vocab_size=256,
    d_model=64,
    num_layers=2,
    num_heads=8,
    num_kv_heads=2,
    mlp_dim=128,
    max_seq_len=64,
    dtype='float32',
    remat='none',
  )
  c.train.update(
    steps=3,
    seq_len=32,
    global_batch_size=8,
    microbatches=1,
    log_every=1,
    loss_chunk_len=8,
  )
  c.optim.update(peak_lr=1e-2, warmup_steps=1)
  c.mesh.update(data=1, tensor=1)
  return c


@pytest.fixture(scope='session')
def make_tiny_config():
  """A factory of fresh tiny configs, for fixtures wider than one test."""
  return _tiny_config


@pytest.fixture
def tiny_config():
  return _tiny_config()
