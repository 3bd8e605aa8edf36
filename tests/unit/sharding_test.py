"""Every mesh gives the one-device result; the rules table puts each parameter where Megatron does."""

import functools

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from clm_jax.parallel import sharding
from clm_jax.train import step as step_lib
from tests.helpers import batches


def _train(c, data, tensor, fsdp=False, steps=3):
  c.mesh.update(data=data, tensor=tensor, fsdp=fsdp)
  mesh = sharding.make_mesh(c.mesh, jax.devices()[: data * tensor])
  s = step_lib.setup(c, mesh)
  losses = []
  with jax.set_mesh(mesh):
    state = s.init_state(jax.random.key(0))
    for i in range(steps):
      state, m = s.train_step(state, sharding.host_to_global(batches.packed_batch(c, i), mesh))
      losses.append(float(m['loss']))
      grad_norm = float(m['grad_norm'])
  return losses, grad_norm, jax.device_get(state.params), state


@pytest.fixture(scope='module')
def reference(make_tiny_config):
  """The one-device run every mesh is compared with (computed once)."""
  return _train(make_tiny_config(), 1, 1)


# Adam scales each entry by its own gradient's size, so rounding in a nearly
# zero gradient entry (one embedding entry's was 1.8e-7) shows in its update:
# reordered sums moved such entries by up to 3.6e-5 after 3 steps, 4e-3 of
# one update (lr 1e-2). Hence atol 1e-4, 1% of one update.
def _assert_params_close(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4), a, b)


@pytest.mark.parametrize(
  'data,tensor,fsdp',
  [
    (8, 1, False),
    (4, 2, False),
    (2, 4, False),
    (1, 8, False),
    (4, 2, True),
    (8, 1, True),
  ],
)
def test_mesh_matches_one_device(tiny_config, reference, data, tensor, fsdp):
  ref_losses, ref_norm, ref_params, _ = reference
  losses, norm, params, state = _train(tiny_config, data, tensor, fsdp)
  # Losses at steps 2 and 3 depend on the gradients and updates of the steps
  # before, so equal losses plus equal final params check all three.
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  np.testing.assert_allclose(norm, ref_norm, rtol=1e-5)
  _assert_params_close(params, ref_params)
  # And the state really is split: the big matrices live in pieces.
  wq = state.params['blocks']['attn']['wq']
  assert wq.addressable_shards[0].data.size == wq.size // tensor // (data if fsdp else 1)


def test_microbatch_accumulation_equals_one_large_batch(tiny_config):
  c = tiny_config
  one, norm_one, params_one, _ = _train(c.copy_and_resolve_references(), 2, 1, steps=2)
  c.train.microbatches = 4
  acc, norm_acc, params_acc, _ = _train(c, 2, 1, steps=2)
  np.testing.assert_allclose(acc, one, rtol=1e-5)
  np.testing.assert_allclose(norm_acc, norm_one, rtol=1e-5)
  _assert_params_close(params_acc, params_one)


@pytest.mark.parametrize(
  'data,tensor,microbatches,loss_mask',
  [
    (1, 1, 8, False),  # One row per micro-batch.
    (2, 1, 4, False),
    (2, 2, 2, True),  # Instruction data: only marked targets count.
  ],
)
def test_accumulated_step_equals_the_plain_full_batch_loss(
  tiny_config, data, tensor, microbatches, loss_mask
):
  c = tiny_config
  c.train.microbatches = microbatches
  c.mesh.update(data=data, tensor=tensor)
  mesh = sharding.make_mesh(c.mesh, jax.devices()[: data * tensor])
  s = step_lib.setup(c, mesh)
  batch = batches.packed_batch(c, 0, loss_mask)
  weights = batches.target_weights(batch)
  # Micro-batch m holds rows m, M + m, ...: their real targets must differ in
  # number, or a mean of per-micro-batch means would pass too.
  per_micro = weights.reshape(-1, microbatches, weights.shape[1]).sum((0, 2))
  assert per_micro.min() < per_micro.max(), per_micro
  fn = jax.jit(
    functools.partial(
      step_lib.grads_and_loss,
      s.graphdef,
      schedule=s.pipeline_schedule,
      microbatches=microbatches,
      loss_chunk_len=c.train.loss_chunk_len,
    )
  )
  with jax.set_mesh(mesh):
    state = s.init_state(jax.random.key(0))
    params = jax.device_get(state.params)
    global_batch = sharding.host_to_global(batch, mesh)
    loss, count, grads = fn(state.params, global_batch)
    grads = jax.device_get(grads)
    _, metrics = s.train_step(state, global_batch)
  ref_loss, ref_grads = batches.reference_loss_and_grads(s.graphdef, params, batch)
  assert float(count) == float(metrics['target_tokens']) == weights.sum()
  # Measured: loss within 1e-7 relative, gradients within 9e-8 absolute (the
  # largest is 0.13). A mean of per-micro-batch means was 5e-4 to 4e-3 off.
  np.testing.assert_allclose([loss, metrics['loss']], ref_loss, rtol=1e-6)
  ref_norm = np.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in jax.tree.leaves(ref_grads)))
  np.testing.assert_allclose(metrics['grad_norm'], ref_norm, rtol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=3e-7), grads, ref_grads
  )


def test_golden_parameter_shardings(tiny_config):
  c = tiny_config
  c.mesh.update(data=2, tensor=4)
  mesh = sharding.make_mesh(c.mesh, jax.devices())
  specs = jax.tree.map(lambda s: s.spec, step_lib.setup(c, mesh).state_shardings.params)
  assert specs == {
    'embed': P('tensor', None),  # vocab-parallel
    'lm_head': P(None, 'tensor'),  # vocab-parallel
    'final_norm': {'scale': P(None)},
    'blocks': {
      'attn_norm': {'scale': P(None, None)},
      'mlp_norm': {'scale': P(None, None)},
      'attn': {
        'wq': P(None, None, 'tensor', None),  # column-parallel
        'wk': P(None, None, None, None),  # 2 kv heads do not split 4 ways: replicated
        'wv': P(None, None, None, None),
        'wo': P(None, 'tensor', None, None),  # row-parallel
      },
      'mlp': {
        'w_gate': P(None, None, 'tensor'),  # column-parallel
        'w_up': P(None, None, 'tensor'),
        'w_down': P(None, 'tensor', None),  # row-parallel
      },
    },
  }
  c.mesh.update(data=4, tensor=2, fsdp=True)
  mesh = sharding.make_mesh(c.mesh, jax.devices())
  s = step_lib.setup(c, mesh)
  specs = jax.tree.map(lambda s: s.spec, s.state_shardings.params)
  assert specs['blocks']['attn']['wk'] == P(None, 'data', 'tensor', None)  # 2 kv heads / 2
  assert specs['blocks']['mlp']['w_down'] == P(None, 'tensor', 'data')
  assert specs['embed'] == P('tensor', 'data')
  # Adam moments are sharded exactly like the parameters.
  adam = s.state_shardings.opt_state.inner_state[1][0]
  assert jax.tree.map(lambda s: s.spec, adam.mu) == specs
  assert jax.tree.map(lambda s: s.spec, adam.nu) == specs


def test_init_is_sharded_not_gathered(tiny_config):
  c = tiny_config
  c.mesh.update(data=2, tensor=4)
  mesh = sharding.make_mesh(c.mesh, jax.devices())
  s = step_lib.setup(c, mesh)
  compiled = s.init_state.lower(jax.random.key(0)).compile()
  # Every output is produced in its final sharding, none whole on one device.
  out = compiled.output_shardings
  assert out.params['embed'].spec == P('tensor', None)
  total = sum(
    x.size * x.dtype.itemsize
    for x in jax.tree.leaves(jax.eval_shape(s.init_state, jax.random.key(0)))
  )
  per_device = compiled.memory_analysis().output_size_in_bytes
  assert per_device < total
