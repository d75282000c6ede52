"""Model building blocks: the counter-hash dropout (rate, determinism, scaling) and the exact GELU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recjax.models import layers


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_keep_fraction_matches_rate(rate):
  keep = np.asarray(layers.hash_keep_mask(jax.random.key(0), (200, 500), rate))
  assert abs(keep.mean() - (1 - rate)) < 0.005
  # No structure along either axis: row / column means spread like binomials.
  p = 1 - rate
  for axis, n in ((0, 200), (1, 500)):
    std = keep.mean(axis).std()
    assert 0.8 < std / np.sqrt(p * (1 - p) / n) < 1.2


def test_mask_is_a_function_of_rng_and_shape():
  a = layers.hash_keep_mask(jax.random.key(1), (64, 64), 0.5)
  b = layers.hash_keep_mask(jax.random.key(1), (64, 64), 0.5)
  c = layers.hash_keep_mask(jax.random.key(2), (64, 64), 0.5)
  np.testing.assert_array_equal(a, b)
  assert 0.4 < np.mean(np.asarray(a) != np.asarray(c)) < 0.6


@pytest.mark.parametrize("impl", ["hash", "threefry"])
def test_dropout_scales_kept_values(impl):
  x = jnp.ones((100, 100))
  y = layers.Dropout(0.25, impl).apply({}, x, False,
                                       rngs={"dropout": jax.random.key(3)})
  vals = np.unique(np.asarray(y))
  np.testing.assert_allclose(sorted(vals), [0.0, 1 / 0.75], rtol=1e-6)
  assert abs(float(y.mean()) - 1.0) < 0.03
  np.testing.assert_array_equal(
      layers.Dropout(0.25, impl).apply({}, x, True), x)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gelu_exact_equals_erfc_gelu(dtype):
  """layers.gelu_exact (erf form, custom derivative) = jax.nn.gelu(approximate=False):
  values, first and second derivatives, over the range where GELU bends and its tails."""
  x = jnp.linspace(-12.0, 12.0, 4001).astype(dtype)
  ref = lambda v: jax.nn.gelu(v, approximate=False)
  tol = 2e-6 if dtype == jnp.float32 else 2e-2
  for f, g in [(layers.gelu_exact, ref),
               (jax.vmap(jax.grad(layers.gelu_exact)), jax.vmap(jax.grad(ref))),
               (jax.vmap(jax.grad(jax.grad(layers.gelu_exact))),
                jax.vmap(jax.grad(jax.grad(ref))))]:
    a, b = np.asarray(f(x), np.float32), np.asarray(g(x), np.float32)
    np.testing.assert_allclose(a, b, atol=tol, rtol=tol)
  assert layers.gelu_exact(x).dtype == dtype
  # Not the tanh approximation (differs by up to ~5e-4 near |x| ~ 2).
  approx = np.asarray(jax.nn.gelu(jnp.linspace(-3.0, 3.0, 601), approximate=True))
  assert np.max(np.abs(np.asarray(layers.gelu_exact(jnp.linspace(-3.0, 3.0, 601)))
                       - approx)) > 1e-4
