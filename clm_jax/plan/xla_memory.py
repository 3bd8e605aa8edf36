"""XLA's own memory figure for a config: the real train step, compiled on abstract arrays.

The step is lowered and compiled for the configured mesh with every input a
jax.ShapeDtypeStruct, so nothing is allocated: a 34B model on 128 devices
compiles on a laptop's CPU. The mesh needs that many devices; `measure_in_subprocess`
starts a Python whose CPU platform has them (--xla_force_host_platform_device_count).

The figure is the CPU compiler's buffer assignment of the per-device SPMD
program. GPU compilation fuses and schedules differently, so on GPUs expect
the same order, not the same bytes.

Run as `python -m clm_jax.plan.xla_memory < config.json` it prints the figures as
JSON; the config is the flattened dict that `clm_jax.config.flatten` gives.
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
  """The train step of config `c` on `mesh`, compiled on abstract state and batch.

  Returns:
    (setup, compiled, seconds): step_lib.setup's result, the compiled step and
    how long lowering and compiling took.
  """
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

  Returns:
    {'arguments', 'outputs', 'aliased', 'temporaries', 'total'}: the total is
    arguments + outputs - aliased (the donated state) + temporaries.
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
