"""Checkpoints: resharding, retention, and damaged steps detected, skipped and set aside."""

import json
import logging
import shutil
import sys
import types
import zlib

import grain
import jax
import numpy as np
import pytest

from clm_jax.ckpt import checkpoint
from clm_jax.ckpt import checksums
from clm_jax.ckpt import params as params_lib
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
  assert f'checkpoint {directory / "4"} is damaged' in caplog.text
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


# Damage, on a small state: two steps of distinct values, each damaged as a disk or copy would.


def _state(step):
  rng = np.random.default_rng(step)
  return {'w': rng.standard_normal(300_000).astype(np.float32), 'b': np.full(7, step, np.int32)}


def _abstract():
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), _state(0))


@pytest.fixture
def two_steps(tiny_config, tmp_path):
  """A Checkpointer over steps 1 and 2 of `_state`; the data iterator was at 1, then 2."""
  c = tiny_config
  tokenizer = tmp_path / 'tok.model'
  tokenizer.write_bytes(b'a tokenizer')
  data_it = iter(grain.MapDataset.range(10).to_iter_dataset())
  ckpt = checkpoint.Checkpointer(tmp_path, c.checkpoint)
  for step in (1, 2):
    next(data_it)
    ckpt.save(step, _state(step), data_it, config={}, tokenizer_path=tokenizer, loop={'s': step})
  ckpt.wait()
  ckpt.close()

  def reopen():
    return checkpoint.Checkpointer(tmp_path, c.checkpoint), tokenizer

  return tmp_path / 'checkpoints', reopen


def _flip_4k(step_dir):
  """Inverts 4 KiB of the state's largest data file: without checksums, it reads back as garbage."""
  path = max(
    (p for p in (step_dir / 'state').rglob('*') if p.is_file()), key=lambda p: p.stat().st_size
  )
  data = bytearray(path.read_bytes())
  # Inside the first zstd block, which holds random floats stored raw (uncompressible).
  data[8192 : 8192 + 4096] = bytes(b ^ 0xFF for b in data[8192 : 8192 + 4096])
  path.write_bytes(bytes(data))
  return path


def _snapshot(directory) -> dict:
  return {
    str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob('*') if p.is_file()
  }


def _warnings(caplog) -> list[str]:
  lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert all('\n' not in line and len(line) < 600 for line in lines), lines
  return lines


def _assert_restored(got, step):
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), _state(step))


def test_the_checksums_are_every_file_s_crc32_and_match_the_committed_step(two_steps):
  directory, _ = two_steps
  record = json.loads((directory / '2' / checksums.FILE).read_text())
  files = {p.relative_to(directory / '2').as_posix() for p in (directory / '2').rglob('*')}
  listed = set(record['files'])
  # Everything but what Orbax writes after the callback, and the checksums themselves.
  assert {f for f in files if (directory / '2' / f).is_file()} - listed == {
    '_CHECKPOINT_METADATA', 'commit_success.txt', checksums.FILE
  }  # fmt: skip
  for name in ('state/_METADATA', 'data/process_0-of-1.json'):
    body = (directory / '2' / name).read_bytes()
    assert record['files'][name] == {'bytes': len(body), 'crc32': [zlib.crc32(body)]}
  assert checksums.verify(directory / '2') is None
  assert not list(directory.glob('*tmp*'))


def test_a_bit_flip_in_the_state_data_falls_back_to_the_step_before(two_steps, caplog):
  directory, reopen = two_steps
  flipped = _flip_4k(directory / '2')
  name, size = flipped.relative_to(directory / '2'), flipped.stat().st_size
  ckpt, tokenizer = reopen()
  data_it = iter(grain.MapDataset.range(10).to_iter_dataset())
  with caplog.at_level(logging.WARNING):
    step, state, loop = ckpt.restore_latest(_abstract(), data_it)
  assert (step, loop) == (1, {'s': 1})
  _assert_restored(state, 1)
  assert next(data_it) == 1  # Step 1's data position, not step 2's.
  warned = [w for w in _warnings(caplog) if 'is damaged' in w]
  assert warned == [
    f'checkpoint {directory / "2"} is damaged ({name} differs from its checksum in bytes '
    f'0-{size - 1}); trying step 1'
  ]
  # Kept for inspection, out of the way of the run's next save of step 2.
  assert (directory / '2.damaged' / checksums.FILE).is_file()
  ckpt.save(2, _state(2), data_it, config={}, tokenizer_path=tokenizer, loop={})
  ckpt.wait()
  assert ckpt.all_steps() == [1, 2]
  ckpt.close()


@pytest.mark.parametrize('with_checksums', [True, False])
@pytest.mark.parametrize(
  'lost, problem',
  [
    ('state/_METADATA', 'state/_METADATA is missing'),
    ('data/process_0-of-1.json', 'data/process_0-of-1.json is missing'),
  ],
)
def test_a_lost_file_is_damage_not_another_model_or_process_count(
  two_steps, caplog, lost, problem, with_checksums
):
  directory, reopen = two_steps
  (directory / '2' / lost).unlink()
  if not with_checksums:  # As a step saved before checksums were kept.
    (directory / '2' / checksums.FILE).unlink(missing_ok=True)
  ckpt, _ = reopen()
  with caplog.at_level(logging.WARNING):
    step, state, _ = ckpt.restore_latest(
      _abstract(), iter(grain.MapDataset.range(10).to_iter_dataset())
    )
  assert step == 1
  _assert_restored(state, 1)
  warned = _warnings(caplog)
  assert f'checkpoint {directory / "2"} is damaged ({problem}); trying step 1' in warned
  assert not any('another number of processes' in w for w in warned)
  ckpt.close()


def test_an_unreadable_step_without_checksums_warns_in_one_line(two_steps, caplog, monkeypatch):
  directory, reopen = two_steps
  seen = []  # What reaches the hook that was there before.
  monkeypatch.setattr(sys, 'unraisablehook', seen.append)
  (directory / '2' / checksums.FILE).unlink(missing_ok=True)
  for path in (directory / '2' / 'state').rglob('*'):
    if path.is_file() and 'ocdbt' in str(path):
      path.write_bytes(b'\0' * 7)
  ckpt, _ = reopen()
  with caplog.at_level(logging.WARNING):
    step, _, _ = ckpt.restore_latest(
      _abstract(), iter(grain.MapDataset.range(10).to_iter_dataset())
    )
  assert step == 1
  warned = _warnings(caplog)  # Orbax's error: one line, without TensorStore's spec.
  assert [w for w in warned if 'is damaged' in w] == [
    w for w in warned if w.startswith(f'checkpoint {directory / "2"} is damaged (ValueError: ')
  ]
  assert len([w for w in warned if 'is damaged' in w]) == 1
  assert any('has no checksums.json' in w for w in warned)
  ckpt.close()
  # TensorStore's reads still in flight end in the event loop Orbax closed; only
  # those errors are dropped.
  for e in (RuntimeError('Event loop is closed'), RuntimeError('another error')):
    sys.unraisablehook(types.SimpleNamespace(exc_type=type(e), exc_value=e, object=None))
  assert [str(u.exc_value) for u in seen] == ['another error']


def test_when_every_step_is_damaged_it_refuses_and_changes_nothing(two_steps):
  directory, reopen = two_steps
  _flip_4k(directory / '1')
  (directory / '2' / 'state' / '_METADATA').unlink()
  before = _snapshot(directory)
  ckpt, _ = reopen()
  with pytest.raises(checkpoint.DamagedCheckpointError) as e:
    ckpt.restore_latest(_abstract(), iter(grain.MapDataset.range(10).to_iter_dataset()))
  assert (
    f'every checkpoint in {directory} is damaged: step 2: state/_METADATA is missing; step 1: state/'
    in str(e.value)
  )
  assert '--restart_from_scratch' in str(e.value)
  ckpt.close()
  assert _snapshot(directory) == before


def test_restart_from_scratch_sets_the_damaged_steps_aside_and_starts_afresh(two_steps):
  directory, reopen = two_steps
  for step in ('1', '2'):
    _flip_4k(directory / step)
  before = _snapshot(directory)
  ckpt, tokenizer = reopen()
  data_it = iter(grain.MapDataset.range(10).to_iter_dataset())
  assert ckpt.restore_latest(_abstract(), data_it, restart_from_scratch=True) is None
  assert next(data_it) == 0
  # Every file kept, byte for byte, under <step>.damaged/.
  assert _snapshot(directory) == {
    '{}.damaged/{}'.format(*name.split('/', 1)): body for name, body in before.items()
  }
  for step in (1, 2):
    ckpt.save(step, _state(step + 10), data_it, config={}, tokenizer_path=tokenizer, loop={})
  ckpt.wait()
  assert ckpt.all_steps() == [1, 2]
  ckpt.close()


def test_a_stray_step_directory_counts_neither_for_resume_nor_for_retention(
  two_steps, tiny_config, caplog
):
  directory, reopen = two_steps
  (directory / '999').mkdir()
  (directory / '999' / 'notes.txt').write_text('not a checkpoint')
  (directory / 'README').write_text('nor this')
  ckpt, tokenizer = reopen()
  data_it = iter(grain.MapDataset.range(10).to_iter_dataset())
  with caplog.at_level(logging.WARNING):
    step, state, _ = ckpt.restore_latest(_abstract(), data_it)
  assert step == 2
  _assert_restored(state, 2)
  warned = _warnings(caplog)
  assert f'{directory / "999"} is not a checkpoint: ignored' in warned
  assert f'{directory / "README"} is not a checkpoint: ignored' in warned
  assert tiny_config.checkpoint.keep == 3
  for step in (3, 4, 5):
    ckpt.save(step, _state(step), data_it, config={}, tokenizer_path=tokenizer, loop={})
  ckpt.wait()
  assert ckpt.all_steps() == [3, 4, 5]
  # Nothing of it is lost: it only had to leave the name a save of step 999 takes.
  assert (directory / '999.not-a-checkpoint' / 'notes.txt').read_text() == 'not a checkpoint'
  assert (directory / 'README').read_text() == 'nor this'
  ckpt.close()


def test_a_save_that_orbax_would_skip_is_an_error(two_steps):
  _, reopen = two_steps
  ckpt, tokenizer = reopen()
  data_it = iter(grain.MapDataset.range(10).to_iter_dataset())
  with pytest.raises(checkpoint.CheckpointError, match='step 1 was not saved: .* holds step 2'):
    ckpt.save(1, _state(1), data_it, config={}, tokenizer_path=tokenizer, loop={})
  ckpt.close()


def test_reading_the_params_of_a_damaged_step_is_an_error(saved_2x2x2):
  _, ckpt, _, saved, _ = saved_2x2x2
  ckpt.close()
  workdir = ckpt.directory.parent
  step, params, _, _ = params_lib.read_params(workdir)
  assert step == 2
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), saved)
  _flip_4k(ckpt.directory / '2')
  with pytest.raises(checkpoint.CheckpointError, match=r'checkpoints/2 is damaged \(state/'):
    params_lib.read_params(workdir)
