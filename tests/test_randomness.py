"""The key of the second pass: a fresh dropout mask (the default, as the official
code draws one per forward pass) or the same one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fsam_optax

RHO = 0.1


def dropout_loss(params, key, x, *, rate=0.5):
  h = jnp.tanh(x @ params["w"])
  keep = jax.random.bernoulli(key, 1 - rate, h.shape)
  return jnp.mean(jnp.where(keep, h / (1 - rate), 0.0) ** 2)


def kw_loss(params, x, *, key):
  return dropout_loss(params, key, x)


def setup():
  k1, k2 = jax.random.split(jax.random.key(0))
  params = {"w": jax.random.normal(k1, (4, 8))}
  return params, jax.random.key(7), jax.random.normal(k2, (16, 4))


def by_hand(params, key_clean, key_perturbed, x):
  """SAM's two gradients written out: g at theta, g' at theta + rho g / ||g||."""
  g = jax.grad(dropout_loss)(params, key_clean, x)
  e = jax.tree.map(lambda v: RHO * v / optax.tree.norm(g), g)
  return g, jax.grad(dropout_loss)(optax.apply_updates(params, e), key_perturbed, x)


FRESH = lambda key: jax.random.fold_in(key, 1)
SAME = lambda key: key


@pytest.mark.parametrize(
  ("options", "second_key", "other_key"),
  [
    (dict(rng_arg=1), FRESH, SAME),  # the default
    (dict(rng_arg=1, second_pass_rng="fresh"), FRESH, SAME),
    (dict(rng_arg=1, second_pass_rng="same"), SAME, FRESH),
    (dict(), SAME, FRESH),  # no rng_arg: both passes get the same arguments
  ],
  ids=["default", "fresh", "same", "no_rng_arg"],
)
def test_second_pass_key(options, second_key, other_key):
  params, key, x = setup()
  with jax.enable_x64(True):
    params = jax.tree.map(lambda v: v.astype(jnp.float64), params)
    x = x.astype(jnp.float64)
    grad_fn = fsam_optax.sam_value_and_grad(dropout_loss, **options)
    _, grads = grad_fn(params, fsam_optax.sam(RHO).init(params), key, x)
    _, g_pert = by_hand(params, key, second_key(key), x)
    _, g_other = by_hand(params, key, other_key(key), x)
  np.testing.assert_allclose(grads["w"].perturbed, g_pert["w"], rtol=1e-10, atol=1e-14)
  # The other choice gives a different gradient: the masks really differ.
  assert not np.allclose(grads["w"].perturbed, g_other["w"], rtol=1e-3)


def test_key_given_by_keyword():
  params, key, x = setup()
  grad_fn = fsam_optax.sam_value_and_grad(kw_loss, rng_arg="key")
  _, grads = grad_fn(params, fsam_optax.sam(RHO).init(params), x, key=key)
  _, g_pert = by_hand(params, key, jax.random.fold_in(key, 1), x)
  np.testing.assert_allclose(grads["w"].perturbed, g_pert["w"], rtol=1e-5)


@pytest.mark.parametrize(
  ("kwargs", "message"),
  [
    (dict(rng_arg=0), r"`rng_arg` must be the position of the key among fun's arguments \(>= 1"),
    (dict(rng_arg=1.5), r"`rng_arg` must be the position"),
    (dict(rng_arg=1, second_pass_rng="new"), r"`second_pass_rng` must be 'fresh' or 'same'"),
  ],
)
def test_bad_rng_options_are_refused(kwargs, message):
  with pytest.raises(ValueError, match=message):
    fsam_optax.sam_value_and_grad(dropout_loss, **kwargs)


@pytest.mark.parametrize(
  ("rng_arg", "message"),
  [(5, r"rng_arg=5 but fun received only 3"), ("rng", r"rng_arg='rng' names no keyword")],
)
def test_rng_arg_missing_from_the_call_is_refused(rng_arg, message):
  params, key, x = setup()
  grad_fn = fsam_optax.sam_value_and_grad(dropout_loss, rng_arg=rng_arg)
  with pytest.raises(ValueError, match=message):
    grad_fn(params, fsam_optax.sam(RHO).init(params), key, x)
