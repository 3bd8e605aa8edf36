"""Checkpoints: exact resume after kill -9 and SIGTERM, damaged steps skipped, resharding."""

import json
import logging
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import batches
import cli
import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from clm_jax.ckpt import checkpoint
from clm_jax.ckpt import params as params_lib
from clm_jax.parallel import sharding
from clm_jax.train import step as step_lib

STEPS = 16
FLAGS = [
  f'--config.train.steps={STEPS}',
  '--config.train.log_every=1',
  '--config.train.eval_every=8',
  '--config.checkpoint.every=4',
]
EXACT = ('loss', 'lr', 'grad_norm', 'target_tokens', 'eval_loss')


def _metrics(workdir) -> dict[int, dict]:
  """step -> the exact metrics of its lines, the later line winning (the contract)."""
  out = {}
  for line in (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines():
    m = json.loads(line)
    out.setdefault(m['step'], {}).update({k: m[k] for k in EXACT if k in m})
  return out


def _logged_steps(workdir) -> int:
  path = pathlib.Path(workdir) / 'metrics.jsonl'
  if not path.exists():
    return 0
  steps = [json.loads(line)['step'] for line in path.read_text().splitlines() if line]
  return max(steps, default=0)


def _wait_for(condition, proc, timeout=300):
  deadline = time.time() + timeout
  while not condition():
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert time.time() < deadline, 'timed out'
    time.sleep(0.005)


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp('cache')


@pytest.fixture(scope='module')
def reference(tmp_path_factory, cache):
  workdir = tmp_path_factory.mktemp('reference')
  cli.train(workdir, cache, *FLAGS)
  return _metrics(workdir)


def test_kill_9_at_a_random_step_then_resume_is_bitwise_the_same_run(reference, cache, tmp_path):
  kill_at = random.Random().randint(5, 11)
  proc = cli.start_train(tmp_path, cache, *FLAGS)
  _wait_for(lambda: _logged_steps(tmp_path) >= kill_at, proc)
  proc.kill()
  proc.wait()
  assert _logged_steps(tmp_path) < STEPS
  cli.train(tmp_path, cache, *FLAGS)
  assert _metrics(tmp_path) == reference, f'killed at step {kill_at}'


def test_kill_9_during_an_async_save_keeps_the_previous_checkpoint(reference, cache, tmp_path):
  checkpoints = tmp_path / 'checkpoints'

  def finished():
    return [int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()]

  def saving_after_a_finished_one():  # Orbax writes under a temporary name, then renames.
    return (
      checkpoints.is_dir() and finished() and any('tmp' in p.name for p in checkpoints.iterdir())
    )

  proc = cli.start_train(tmp_path, cache, *FLAGS, '--config.checkpoint.every=3')
  _wait_for(saving_after_a_finished_one, proc)
  proc.kill()
  proc.wait()
  last = max(finished())
  assert last < STEPS
  out = cli.train(tmp_path, cache, *FLAGS, '--config.checkpoint.every=3')
  assert f'resuming from {checkpoints}/{last}' in out.stderr
  assert _metrics(tmp_path) == reference
  assert not any('tmp' in p.name for p in checkpoints.iterdir())


def test_sigterm_saves_and_exits_0_and_the_next_start_resumes(reference, cache, tmp_path):
  proc = cli.start_train(tmp_path, cache, *FLAGS)
  _wait_for(lambda: _logged_steps(tmp_path) >= 6, proc)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 0, stderr[-3000:]
  assert 'SIGTERM: finishing this step, saving' in stderr
  saved = max(int(p.name) for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit())
  # The save came from the signal, whichever step it landed on.
  assert 6 <= saved < STEPS and f'SIGTERM: saved step {saved}; exiting' in stderr
  out = cli.train(tmp_path, cache, *FLAGS)
  assert f'resuming from {tmp_path / "checkpoints"}/{saved}' in out.stderr
  assert _metrics(tmp_path) == reference


def test_another_model_shape_is_a_clear_error(cache, tmp_path):
  cli.train(tmp_path, cache, '--config.train.steps=2')
  out = cli.train(
    tmp_path, cache, '--config.train.steps=4', '--config.model.mlp_dim=96', check=False
  )
  assert out.returncode != 0
  assert 'params/blocks/mlp/w_down has shape (2, 128, 64) but this model needs (2, 96, 64)' in (
    out.stderr
  )
  assert 'Traceback' not in out.stderr


def _setup(c, data, tensor, stages):
  c.mesh.update(data=data, tensor=tensor, pipeline=stages)
  mesh = sharding.make_mesh(c.mesh, jax.devices()[: data * tensor * stages])
  return mesh, step_lib.setup(c, mesh)


def _save(c, s, ckpt, step, state, tokenizer_path, data_it):
  ckpt.save(
    step,
    s.to_checkpoint(state),
    data_it,
    config=c.to_dict(),
    tokenizer_path=tokenizer_path,
    loop={'meter': {'losses': []}},
  )
  ckpt.wait()


@pytest.fixture
def saved_2x2x2(tiny_config, tmp_path):
  """A (2, 2, 2) run saved after 2 steps, and its loss at step 3 had it gone on."""
  c = tiny_config
  c.train.microbatches = 2
  tok = tmp_path / 'tok.model'
  tok.write_bytes(b'not read back by these tests')
  data_it = iter(grain.MapDataset.range(4).to_iter_dataset())
  mesh, s = _setup(c, 2, 2, 2)
  ckpt = checkpoint.Checkpointer(tmp_path, c.checkpoint)
  with jax.set_mesh(mesh):
    state = s.init_state(jax.random.key(0))
    for i in range(2):
      state, _ = s.train_step(state, sharding.host_to_global(batches.packed_batch(c, i), mesh))
    _save(c, s, ckpt, 2, state, tok, data_it)
    params = jax.device_get(s.to_checkpoint(state).params)
    _, m = s.train_step(state, sharding.host_to_global(batches.packed_batch(c, 2), mesh))
  return c, ckpt, data_it, params, float(m['loss'])


@pytest.mark.parametrize('data,tensor,stages', [(1, 1, 1), (4, 2, 1), (2, 1, 2)])
def test_restore_on_another_mesh_gives_the_same_params_and_next_loss(
  saved_2x2x2, data, tensor, stages
):
  c, ckpt, data_it, saved, next_loss = saved_2x2x2
  mesh, s = _setup(c, data, tensor, stages)
  with jax.set_mesh(mesh):
    step, state, _ = ckpt.restore_latest(jax.eval_shape(s.init_state, jax.random.key(0)), data_it)
    state = s.from_checkpoint(state)
    assert step == 2
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), saved)
    wq = state.params['blocks']['attn']['wq']
    assert wq.sharding.mesh == mesh
    _, m = s.train_step(state, sharding.host_to_global(batches.packed_batch(c, 2), mesh))
  np.testing.assert_allclose(float(m['loss']), next_loss, rtol=1e-6)


def test_damaged_and_partial_steps_are_skipped_with_a_warning(saved_2x2x2, caplog):
  c, ckpt, data_it, saved, _ = saved_2x2x2
  directory = ckpt.directory
  # Step 4: a finished step whose arrays were lost (a disk error, a bad copy).
  shutil.copytree(directory / '2', directory / '4')
  for path in (directory / '4' / 'state').rglob('*'):
    if path.is_file() and path.name != '_METADATA' and 'ocdbt' in str(path):
      path.write_bytes(b'\0' * 7)
  # Step 6: a save cut off before Orbax's final rename.
  shutil.copytree(directory / '2', directory / '6.orbax-checkpoint-tmp-123')
  ckpt.close()
  ckpt = checkpoint.Checkpointer(directory.parent, c.checkpoint)
  mesh, s = _setup(c, 2, 2, 2)
  with jax.set_mesh(mesh), caplog.at_level(logging.WARNING):
    step, state, _ = ckpt.restore_latest(jax.eval_shape(s.init_state, jax.random.key(0)), data_it)
  assert step == 2
  assert f'checkpoint {directory / "4"} is unreadable' in caplog.text
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(s.to_checkpoint(state).params), saved)
  assert not (directory / '6.orbax-checkpoint-tmp-123').exists()


def test_convert_to_params_writes_a_small_bf16_params_only_checkpoint(cache, tmp_path):
  run = tmp_path / 'run'
  cli.train(run, cache, '--config.train.steps=2')
  out = cli.launch(
    'convert', '--to_params', '--dtype=bfloat16', f'--workdir={run}', f'--output={tmp_path / "p"}',
    cache=cache,
  )  # fmt: skip
  assert 'Wrote the params of step 2' in out.stdout
  params, config, tokenizer_bytes = params_lib.load_params(tmp_path / 'p')
  assert tokenizer_bytes == (run / 'tokenizer.model').read_bytes()
  assert config['model']['d_model'] == 64
  with ocp.StandardCheckpointer() as reader:  # Orbax itself, no code of ours.
    state = reader.restore(run / 'checkpoints' / '2' / 'state')
  want = jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16), state['params'])
  assert jax.tree.structure(params) == jax.tree.structure(want)
  jax.tree.map(
    lambda a, b: np.testing.assert_array_equal(np.asarray(a), b) or a.dtype == jnp.bfloat16,
    params,
    want,
  )
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
  size = lambda d: sum(p.stat().st_size for p in d.rglob('*') if p.is_file())  # noqa: E731
  assert size(tmp_path / 'p') < size(run / 'checkpoints' / '2' / 'state') / 3
  again = cli.launch(
    'convert', '--to_params', f'--workdir={run}', f'--output={tmp_path / "p"}', cache=cache,
    check=False,
  )  # fmt: skip
  assert again.returncode != 0 and 'exists' in again.stderr


def test_keeps_the_latest_and_every_kth_step(tiny_config, tmp_path):
  c = tiny_config
  c.checkpoint.update(keep=2, keep_period=4)
  tokenizer = tmp_path / 'tok.model'
  tokenizer.write_bytes(b'a tokenizer')
  data_it = iter(grain.MapDataset.range(4).to_iter_dataset())
  ckpt = checkpoint.Checkpointer(tmp_path, c.checkpoint)
  for step in range(1, 11):
    state = {'x': np.full(3, step, np.float32)}
    ckpt.save(step, state, data_it, config={}, tokenizer_path=tokenizer, loop={})
  ckpt.wait()
  assert ckpt.all_steps() == [4, 8, 9, 10]
  ckpt.close()


def test_a_second_signal_exits_at_once(tmp_path):
  script = tmp_path / 'stop.py'
  script.write_text(
    'import os, signal, time\n'
    'from clm_jax import preemption\n'
    'with preemption.StopRequest() as stop:\n'
    '  os.kill(os.getpid(), signal.SIGTERM)\n'
    '  assert stop.requested(1) and stop.signal_name == "SIGTERM"\n'
    '  print("first handled", flush=True)\n'
    '  os.kill(os.getpid(), signal.SIGINT)\n'
    '  time.sleep(30)\n'
  )
  out = subprocess.run(
    [sys.executable, str(script)], capture_output=True, text=True, cwd=cli.ROOT, timeout=60
  )
  assert out.stdout == 'first handled\n'
  assert out.returncode == 128 + signal.SIGINT
  assert 'SIGINT again: exiting now' in out.stderr
