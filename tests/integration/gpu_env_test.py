"""GPU defaults: the user always wins, and every flag is one this jaxlib accepts."""

import os
import subprocess
import sys

from clm_jax.parallel import gpu_env


def test_this_jaxlib_accepts_every_flag():
  # XLA aborts at backend start on a flag it does not know, so a renamed or
  # removed flag fails here rather than on the cluster.
  environ = {}
  gpu_env.apply(environ)
  env = {**os.environ, 'XLA_FLAGS': environ['XLA_FLAGS'], 'JAX_PLATFORMS': 'cpu'}
  code = 'import jax.numpy as jnp; print(float((jnp.arange(4.0) * 2).sum()))'
  result = subprocess.run(
    [sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=120
  )
  assert result.returncode == 0, result.stderr
  assert 'Unknown flag' not in result.stderr
  assert result.stdout.strip() == '12.0'
