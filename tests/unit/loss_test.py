"""The chunked and fused LM-head losses against plain full-logits cross-entropy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clm_jax.model import loss


def _inputs(dtype=jnp.float32, B=2, T=12, D=16, V=40):
  k = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(k[0], (B, T, D)).astype(dtype)
  w = jax.random.normal(k[1], (D, V)) * 0.5
  targets = jax.random.randint(k[2], (B, T), 0, V)
  weights = (jax.random.uniform(k[3], (B, T)) > 0.3).astype(jnp.float32)
  return x, w, targets, weights


def _reference(x, w, targets, weights):
  logits = jnp.einsum('BTD,DV->BTV', x.astype(jnp.float32), w)
  return (optax.softmax_cross_entropy_with_integer_labels(logits, targets) * weights).sum()


@pytest.mark.parametrize('chunk', [12, 4, 3])
def test_token_losses_equal_full_logits(chunk):
  x, w, targets, _ = _inputs()
  got = jax.jit(loss.token_losses, static_argnums=3)(x, w, targets, chunk)
  logits = jnp.einsum('BTD,DV->BTV', x, w)
  want = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('chunk', [12, 4, 3])
def test_fused_loss_and_gradients_equal_autodiff(chunk):
  x, w, targets, weights = _inputs()
  fused = jax.jit(jax.value_and_grad(loss.loss_sum, argnums=(0, 1)), static_argnums=4)
  value, (dx, dw) = fused(x, w, targets, weights, chunk)
  ref_value, (ref_dx, ref_dw) = jax.value_and_grad(_reference, argnums=(0, 1))(
    x, w, targets, weights
  )
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  np.testing.assert_allclose(dx, ref_dx, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(dw, ref_dw, rtol=1e-4, atol=1e-6)
  # Rows with weight 0 get no gradient at all.
  assert float(jnp.abs(dx * (weights == 0)[..., None]).max()) == 0.0


def test_fused_gradient_scales_with_the_cotangent():
  x, w, targets, weights = _inputs()
  g1 = jax.grad(lambda x: loss.loss_sum(x, w, targets, weights, 4))(x)
  g3 = jax.grad(lambda x: 3.0 * loss.loss_sum(x, w, targets, weights, 4))(x)
  np.testing.assert_allclose(g3, 3.0 * g1, rtol=1e-6)


def test_fused_loss_in_bfloat16_is_close_to_float32():
  x, w, targets, weights = _inputs(jnp.bfloat16)
  value, dx = jax.value_and_grad(loss.loss_sum)(x, w, targets, weights, 4)
  ref_value, ref_dx = jax.value_and_grad(_reference)(x, w, targets, weights)
  assert dx.dtype == jnp.bfloat16
  np.testing.assert_allclose(value, ref_value, rtol=2e-2)
  np.testing.assert_allclose(dx.astype(jnp.float32), ref_dx, atol=3e-2)
