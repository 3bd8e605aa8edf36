"""Checkpoints: exact resume after kill -9 and SIGTERM, damaged steps skipped, resharding."""

import logging
import shutil

import grain
import jax
import numpy as np
import pytest

from clm_jax.ckpt import checkpoint
from clm_jax.parallel import sharding
from clm_jax.train import step as step_lib
from tests.helpers import batches

STEPS = 16
FLAGS = [
  f'--config.train.steps={STEPS}',
  '--config.train.log_every=1',
  '--config.train.eval_every=8',
  '--config.checkpoint.every=4',
]
EXACT = ('loss', 'lr', 'grad_norm', 'target_tokens', 'eval_loss')


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
