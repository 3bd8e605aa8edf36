"""The pipeline schedule equals running the layers in sequence on one device."""

import functools
import re

import grain
import jax
import numpy as np
import pytest

from clm_jax import config as config_lib
from clm_jax.ckpt import checkpoint
from clm_jax.model import decoder as model_lib
from clm_jax.parallel import sharding
from clm_jax.train import pipeline
from clm_jax.train import step as step_lib
from tests.helpers import batches

MICROBATCHES = 8


@pytest.fixture
def config(tiny_config):
  c = tiny_config
  c.model.update(num_layers=8, remat='full')
  c.train.update(global_batch_size=16, microbatches=MICROBATCHES)
  return c


def _setup(c, data, tensor, stages, virtual=1):
  c.mesh.update(data=data, tensor=tensor, pipeline=stages, virtual_stages=virtual)
  mesh = sharding.make_mesh(c.mesh, jax.devices()[: data * tensor * stages])
  return mesh, step_lib.setup(c, mesh)


def _loss_and_grads(c, data, tensor, stages, virtual, params, loss_mask=False):
  """Loss and plain-order gradients of `params` (plain order) on a mesh."""
  mesh, s = _setup(c, data, tensor, stages, virtual)
  fn = jax.jit(
    functools.partial(
      step_lib.grads_and_loss,
      s.graphdef,
      schedule=s.pipeline_schedule,
      microbatches=c.train.microbatches,
      loss_chunk_len=c.train.loss_chunk_len,
    ),
    in_shardings=(s.state_shardings.params, sharding.batch_sharding(mesh)),
  )
  with jax.set_mesh(mesh):
    stored = jax.device_put(pipeline.to_storage(params, s.layer_order), s.state_shardings.params)
    batch = sharding.host_to_global(batches.packed_batch(c, 0, loss_mask), mesh)
    loss, count, grads = fn(stored, batch)
    grads = pipeline.to_layer_order(grads, s.layer_order)
  return float(loss), float(count), jax.device_get(grads)


@pytest.fixture(scope='module')
def reference(make_tiny_config):
  """Loss and gradients on one device: the layers in sequence, one micro-batch at a time."""
  c = make_tiny_config()
  c.model.update(num_layers=8, remat='full')
  c.train.update(global_batch_size=16, microbatches=MICROBATCHES)
  _, s = _setup(c, 1, 1, 1)
  params = jax.device_get(s.init_state(jax.random.key(0)).params)
  return params, _loss_and_grads(c, 1, 1, 1, 1, params)


@pytest.mark.parametrize(
  'data,tensor,stages,virtual',
  [
    (1, 1, 2, 1),
    (1, 1, 2, 4),
    (1, 1, 4, 1),
    (1, 1, 4, 2),
    (1, 1, 8, 1),
    (2, 1, 4, 1),
    (2, 1, 4, 2),
    (1, 2, 4, 1),
    (2, 2, 2, 1),
    (2, 2, 2, 2),
  ],
)
def test_pipeline_matches_one_device(config, reference, data, tensor, stages, virtual):
  params, (ref_loss, ref_count, ref_grads) = reference
  loss, count, grads = _loss_and_grads(config, data, tensor, stages, virtual, params)
  assert count == ref_count
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7), grads, ref_grads
  )


@pytest.mark.parametrize(
  'data,tensor,stages,virtual,loss_mask',
  [
    (2, 1, 2, 2, False),
    (1, 2, 4, 1, True),  # Instruction data: only marked targets count.
  ],
)
def test_pipeline_equals_the_plain_full_batch_loss(
  config, reference, data, tensor, stages, virtual, loss_mask
):
  """Not only the same as one stage: the token-weighted mean over the whole batch."""
  params, _ = reference
  loss, count, grads = _loss_and_grads(config, data, tensor, stages, virtual, params, loss_mask)
  batch = batches.packed_batch(config, 0, loss_mask)
  graphdef, _, _ = model_lib.abstract(config_lib.ModelConfig.from_config(config.model))
  ref_loss, ref_grads = batches.reference_loss_and_grads(graphdef, params, batch)
  weights = batches.target_weights(batch)
  per_micro = weights.reshape(-1, MICROBATCHES, weights.shape[1]).sum((0, 2))
  assert per_micro.min() < per_micro.max(), per_micro  # Else a mean of means would pass.
  assert count == weights.sum()
  # Measured: loss within 9e-8 relative, gradients within 8e-8 absolute.
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=3e-7), grads, ref_grads
  )


def test_passes_of_fewer_microbatches_accumulate_to_the_same(config, reference):
  params, (ref_loss, _, ref_grads) = reference
  config.mesh.pipeline_microbatches = 4  # Two passes of 4 through 2 x 2 chunks.
  loss, _, grads = _loss_and_grads(config, 1, 1, 2, 2, params)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7), grads, ref_grads
  )


def test_save_dots_remat_matches(config, reference):
  params, (ref_loss, _, ref_grads) = reference
  config.model.remat = 'save_dots'
  loss, _, grads = _loss_and_grads(config, 1, 1, 4, 2, params)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7), grads, ref_grads
  )


def _train_losses(c, data, tensor, stages, virtual=1, steps=5):
  mesh, s = _setup(c, data, tensor, stages, virtual)
  losses = []
  with jax.set_mesh(mesh):
    state = s.init_state(jax.random.key(0))
    for i in range(steps):
      state, m = s.train_step(state, sharding.host_to_global(batches.packed_batch(c, i), mesh))
      losses.append(float(m['loss']))
    params = jax.device_get(pipeline.to_layer_order(state.params, s.layer_order))
  return losses, params


@pytest.mark.parametrize('virtual', [1, 2])
def test_training_on_a_2x2x2_mesh_follows_one_device(config, virtual):
  config.train.microbatches = 2
  one, one_params = _train_losses(config.copy_and_resolve_references(), 1, 1, 1)
  three_d, params = _train_losses(config, 2, 2, 2, virtual)
  np.testing.assert_allclose(three_d, one, rtol=1e-5)
  # Adam turns rounding in a nearly-zero gradient entry into a visible move
  # (measured 1.6e-5 after 5 steps, 1 of 32,768 entries): atol 1% of one update.
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), params, one_params
  )


def test_stages_hold_their_layers_and_pass_activations_by_collective_permute(config):
  mesh, s = _setup(config, 1, 1, 4)
  with jax.set_mesh(mesh):
    state = s.init_state(jax.random.key(0))
    batch = sharding.host_to_global(batches.packed_batch(config), mesh)
    hlo = s.train_step.lower(state, batch).compile().as_text()
  for leaf in jax.tree.leaves(state.params['blocks']):
    assert leaf.addressable_shards[0].data.shape[0] == leaf.shape[0] // 4
  assert 'collective-permute' in hlo
  # On a (1, 1, 4) mesh every collective runs over 'pipeline'. None may
  # gather weights, and none but collective-permute may move activations
  # ([..., T, D]); what is left are all-reduces of the gradients of the
  # pipeline-replicated embedding, final norm and LM head, and of scalars.
  T, D = config.train.seq_len, config.model.d_model
  for line in hlo.splitlines():
    op = re.search(r'= (.*?) (all-gather|all-reduce|all-to-all|reduce-scatter)(-start)?\(', line)
    if op:
      assert op.group(2) == 'all-reduce', line
      for dims in re.findall(r'\[([\d,]+)\]', op.group(1)):
        assert tuple(int(d) for d in dims.split(','))[-2:] != (T, D), line


def test_layer_order_round_trips_and_is_circular():
  order = pipeline.layer_order(8, 2, 2)  # Chunks of 2 layers: device 0 holds 0, 2.
  np.testing.assert_array_equal(order, [0, 1, 4, 5, 2, 3, 6, 7])
  np.testing.assert_array_equal(pipeline.layer_order(8, 4, 1), np.arange(8))
  tree = {'blocks': {'w': np.arange(8) * 10}, 'embed': np.arange(3)}
  stored = pipeline.to_storage(tree, order)
  np.testing.assert_array_equal(stored['blocks']['w'], order * 10)
  np.testing.assert_array_equal(stored['embed'], tree['embed'])
  back = pipeline.to_layer_order(stored, order)
  np.testing.assert_array_equal(back['blocks']['w'], tree['blocks']['w'])


def test_bubble_fraction():
  assert pipeline.Schedule(4, 1, 16).bubble == pytest.approx(3 / 19)
  assert pipeline.Schedule(4, 2, 16).bubble == pytest.approx(3 / 35)
  assert pipeline.Schedule(1, 1, 1).bubble == 0
  assert pipeline.make_schedule(1, 1, 16).microbatches == 1  # Plain accumulation.


def test_checkpoint_saved_under_one_layout_restores_under_another(config, tmp_path):
  data_it = iter(grain.MapDataset.range(4).to_iter_dataset())
  mesh, s = _setup(config, 1, 1, 4, 2)  # Circular: storage order is not layer order.
  with jax.set_mesh(mesh):
    state = s.init_state(jax.random.key(0))
    state, _ = s.train_step(state, sharding.host_to_global(batches.packed_batch(config), mesh))
    saved = jax.device_get(pipeline.to_layer_order(state.params, s.layer_order))
    ckpt = checkpoint.Checkpointer(tmp_path, config.checkpoint)
    tokenizer = tmp_path / 'tok.model'
    tokenizer.write_bytes(b'a tokenizer')
    ckpt.save(1, s.to_checkpoint(state), data_it, config={}, tokenizer_path=tokenizer, loop={})
    ckpt.wait()
    stored = jax.device_get(state)
  assert not np.array_equal(  # The test would prove nothing otherwise.
    stored.params['blocks']['attn']['wq'], saved['blocks']['attn']['wq']
  )

  for data, stages, virtual in [(1, 1, 1), (2, 2, 1), (1, 2, 2)]:
    mesh, s = _setup(config, data, 1, stages, virtual)
    with jax.set_mesh(mesh):
      target = jax.eval_shape(s.init_state, jax.random.key(0))
      step, restored, _ = ckpt.restore_latest(target, data_it)
      restored = s.from_checkpoint(restored)
      params = jax.device_get(pipeline.to_layer_order(restored.params, s.layer_order))
      mu = restored.opt_state.inner_state[1][0].mu
    jax.tree.map(np.testing.assert_array_equal, params, saved)
    assert step == int(restored.step) == 1 and jax.tree.leaves(mu)[0].sharding.mesh == mesh
  ckpt.close()
