"""Every mesh gives the one-device result; the rules table puts each parameter where Megatron does."""

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


# Adam divides by sqrt(v): last-bit differences in tiny gradients move a
# parameter by up to ~1e-3 of one update (lr 1e-2), hence atol 1e-5.
def _assert_params_close(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5), a, b)


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
