"""The schedule against hand-computed values; decay masking; non-finite skipping."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clm_jax.train import optimizer
from clm_jax.train import step as step_lib
from configs import codellama_34b


def test_codellama_schedule_by_hand():
  c = codellama_34b.get_config()
  schedule = optimizer.make_schedule(c.optim, c.train.steps)
  peak, floor, last = 3e-4, 3e-5, c.train.steps

  def lr_of_step(step):  # Step n (1-based, as logged) is optax's update count n - 1.
    return float(schedule(step - 1))

  def cosine(step):  # From the end of warmup (2000) to train.steps (14902).
    frac = (step - 2000) / (14902 - 2000)
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * frac))

  want = {
    1: peak / 2000,  # The first update trains; it is not a no-op at lr 0.
    2: 2 * peak / 2000,
    1000: peak / 2,
    2000: peak,  # Warmup reaches the peak at step 2000, as the original run's did.
    2001: cosine(2001),
    8451: cosine(8451),
    last - 1: cosine(last - 1),
    last: floor,
  }
  for step, lr in want.items():
    assert lr_of_step(step) == pytest.approx(lr, rel=1e-5, abs=1e-12), step
  assert lr_of_step(last - 1) > floor
  assert min(lr_of_step(s) for s in range(1, last + 1, 97)) > 0


def test_the_first_step_updates_the_params(tiny_config):
  c = tiny_config
  c.optim.update(warmup_steps=10, weight_decay=0.0)
  schedule = optimizer.make_schedule(c.optim, c.train.steps)
  params = {'w': jnp.full((4,), 2.0)}
  opt = optimizer.make_optimizer(c.optim, schedule, {'w': True})
  updates, _ = opt.update({'w': jnp.ones((4,))}, opt.init(params), params)
  # Adam's first step moves every weight by lr (its normalised gradient is 1).
  np.testing.assert_allclose(updates['w'], -c.optim.peak_lr / 10, rtol=1e-5)


def _params():
  return {
    'blocks': {'attn_norm': {'scale': jnp.ones((2, 4))}, 'w': jnp.full((2, 4, 4), 2.0)},
    'final_norm': {'scale': jnp.ones((4,))},
    'embed': jnp.full((8, 4), 2.0),
  }


def _axes():
  return {
    'blocks': {
      'attn_norm': {'scale': ('layers', 'norm')},
      'w': ('layers', 'embed', 'mlp'),
    },
    'final_norm': {'scale': ('norm',)},
    'embed': ('vocab', 'embed'),
  }


def test_weight_decay_skips_norm_scales(tiny_config):
  c = tiny_config.optim
  c.update(peak_lr=0.5, warmup_steps=0, weight_decay=0.1, clip_norm=1.0)
  opt = optimizer.make_optimizer(c, lambda _: 0.5, step_lib.decay_mask(_axes()))
  params = _params()
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = opt.update(zeros, opt.init(params), params)
  new = jax.tree.map(lambda p, u: p + u, params, updates)
  # With zero gradients only decay moves a weight: p * (1 - lr * wd).
  np.testing.assert_allclose(new['blocks']['w'], 2.0 * (1 - 0.05))
  np.testing.assert_allclose(new['embed'], 2.0 * (1 - 0.05))
  np.testing.assert_array_equal(new['blocks']['attn_norm']['scale'], 1.0)
  np.testing.assert_array_equal(new['final_norm']['scale'], 1.0)


def test_nonfinite_gradients_skip_the_update_and_are_counted(tiny_config):
  opt = optimizer.make_optimizer(tiny_config.optim, lambda _: 0.1, step_lib.decay_mask(_axes()))
  params = _params()
  state = opt.init(params)
  bad = jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), params)
  for i in range(3):
    updates, state = opt.update(bad, state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
    assert int(state.notfinite_count) == i + 1
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), params, _params())
  good = jax.tree.map(jnp.ones_like, params)
  updates, state = opt.update(good, state, params)
  assert int(state.notfinite_count) == 0 and int(state.total_notfinite) == 3
  assert float(jnp.abs(updates['blocks']['w']).max()) > 0


def test_gradients_are_clipped_before_adam(tiny_config):
  c = tiny_config.optim
  c.update(clip_norm=1.0, b1=0.9)
  opt = optimizer.make_optimizer(c, lambda _: 0.1, step_lib.decay_mask(_axes()))
  params = _params()
  g = jax.tree.map(lambda p: jnp.full_like(p, 3.0), params)
  norm = math.sqrt(sum(9.0 * x.size for x in jax.tree.leaves(params)))
  _, state = opt.update(g, opt.init(params), params)
  mu = state.inner_state[1][0].mu
  # Adam's first moment saw the clipped gradient: (1 - b1) * g / ||g||.
  np.testing.assert_allclose(mu['blocks']['w'], 0.1 * 3.0 / norm, rtol=1e-6)
