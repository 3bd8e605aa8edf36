"""XLA's own memory figure for a config: the real train step, compiled on abstract arrays.

Nothing is allocated, so a 34B model on 128 devices compiles on a laptop's CPU
(`measure_in_subprocess` fakes the devices). It is the CPU compiler's buffer
assignment: on GPUs expect the same order, not the same bytes. As a script it
reads `clm_jax.config.flatten`'s JSON on stdin and prints the figures.
"""

import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

from clm_jax import config as config_lib
from clm_jax.config import schema
from clm_jax.parallel import sharding
from clm_jax.train import step as step_lib


def compile_step(c, mesh: jax.sharding.Mesh):
  """(setup, compiled step, compile seconds) of config `c` on `mesh`, on abstract inputs."""
  setup = step_lib.setup(c, mesh)
  state = jax.eval_shape(setup.init_state, jax.random.key(0))
  rows = sharding.batch_sharding(mesh)
  keys = ['tokens', 'segment_ids', 'positions'] + (
    ['loss_mask'] if c.data.source == 'instruct' else []
  )
  shape = (c.train.global_batch_size, c.train.seq_len)
  batch = {key: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=rows) for key in keys}
  start = time.perf_counter()
  with jax.set_mesh(mesh):
    compiled = setup.train_step.lower(state, batch).compile()
  return setup, compiled, time.perf_counter() - start


def figures(compiled) -> dict:
  """XLA's memory analysis of a compiled step, in bytes per device.

  'total' is arguments + outputs - aliased (the donated state) + temporaries.
  """
  m = compiled.memory_analysis()
  out = {
    'arguments': m.argument_size_in_bytes,
    'outputs': m.output_size_in_bytes,
    'aliased': m.alias_size_in_bytes,
    'temporaries': m.temp_size_in_bytes,
  }
  out['total'] = out['arguments'] + out['outputs'] - out['aliased'] + out['temporaries']
  return out


def measure(c, devices=None) -> dict:
  """`figures` of config `c`'s train step on `devices` (default all), and its compile seconds."""
  devices = jax.devices() if devices is None else devices
  config_lib.validate(c, len(devices))
  _, compiled, seconds = compile_step(c, sharding.make_mesh(c.mesh, devices))
  return {**figures(compiled), 'compile_seconds': round(seconds, 1)}


def measure_in_subprocess(c, num_devices: int, timeout: float = 3600) -> dict:
  """`measure` in a fresh Python whose CPU platform has `num_devices` devices."""
  env = dict(os.environ)
  flags = [f for f in env.get('XLA_FLAGS', '').split() if 'device_count' not in f]
  env['XLA_FLAGS'] = ' '.join([*flags, f'--xla_force_host_platform_device_count={num_devices}'])
  env['JAX_PLATFORMS'] = 'cpu'
  done = subprocess.run(
    [sys.executable, '-m', 'clm_jax.plan.xla_memory'],
    input=json.dumps(config_lib.flatten(c)),
    capture_output=True,
    text=True,
    env=env,
    timeout=timeout,
    check=False,
  )
  if done.returncode:
    last = done.stderr.strip().splitlines()[-1:] or ['no output']
    raise RuntimeError(f'compiling the train step for {num_devices} devices failed: {last[0]}')
  return json.loads(done.stdout.strip().splitlines()[-1])


def _main():
  c = schema.get_config()
  c.update_from_flattened_dict(json.loads(sys.stdin.read()))
  print(json.dumps(measure(c)))


if __name__ == '__main__':
  _main()
