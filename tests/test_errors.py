"""Bad input gets a ValueError that names the argument and says what to do."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
import pytest

import fsam_optax


def loss(params):
  return jnp.sum(params["w"] ** 2)


PARAMS = {"w": jnp.arange(3.0)}


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(rho=-0.1), "`rho` must be a radius >= 0, got -0.1"),
    (dict(rho=math.nan), "`rho` must be a radius >= 0, got nan"),
    (dict(sigma=-1.0), "`sigma` must be >= 0, got -1.0"),
    (dict(lmbda=1.0), r"`lmbda` must be in \[0, 1\), got 1.0"),
    (dict(lmbda=-0.5), r"`lmbda` must be in \[0, 1\), got -0.5"),
    (dict(eps=0.0), "`eps` must be > 0, got 0.0"),
    (dict(eps=jnp.asarray(-1.0)), "`eps` must be > 0, got -1.0"),
  ],
)
def test_out_of_range_hyperparameters_raise_at_construction(kwargs, message):
  with pytest.raises(ValueError, match=message):
    fsam_optax.fsam(**kwargs)


def test_sam_validates_too():
  with pytest.raises(ValueError, match="`rho` must be a radius >= 0"):
    fsam_optax.sam(rho=-1.0)


def test_non_scalar_hyperparameter_is_refused():
  with pytest.raises(ValueError, match="expected a scalar hyperparameter"):
    fsam_optax.fsam(rho=jnp.ones(2))


@pytest.mark.parametrize("name", ["sigma", "lmbda", "eps"])
def test_only_rho_takes_a_schedule(name):
  schedule = optax.constant_schedule(0.5)
  with pytest.raises(ValueError, match=f"`{name}` must be a number.*only `rho` takes a schedule"):
    fsam_optax.fsam(**{name: schedule})
  fsam_optax.fsam(rho=schedule)  # accepted


def test_traced_hyperparameters_are_accepted_unchecked():
  # Under inject_hyperparams inside jit the values are tracers: nothing to check.
  tx = optax.inject_hyperparams(fsam_optax.fsam)(rho=0.1)
  state = jax.jit(tx.init)(PARAMS)
  assert float(state.hyperparams["rho"]) == pytest.approx(0.1)


def test_helper_without_fsam_state_says_how_to_build_the_optimizer():
  tx = optax.sgd(0.1, momentum=0.9)
  with pytest.raises(
    ValueError, match=r"opt_state holds no F-SAM state.*optax\.chain\(fsam_optax\.fsam"
  ):
    fsam_optax.sam_value_and_grad(loss)(PARAMS, tx.init(PARAMS))


def test_plain_gradients_fed_to_fsam_say_to_use_the_helper():
  tx = optax.chain(fsam_optax.fsam(), optax.sgd(0.1))
  with pytest.raises(ValueError, match=r"fsam received plain gradients.*sam_value_and_grad"):
    tx.update(jax.grad(loss)(PARAMS), tx.init(PARAMS), PARAMS)


def test_fsam_after_another_transformation_says_to_move_it_first():
  tx = optax.chain(optax.clip_by_global_norm(1.0), fsam_optax.fsam(), optax.sgd(0.1))
  with pytest.raises(ValueError, match=r"fsam must be the first transformation.*position 1"):
    fsam_optax.sam_value_and_grad(loss)(PARAMS, tx.init(PARAMS))


def test_fsam_not_first_in_named_chain_is_caught():
  tx = optax.named_chain(("clip", optax.clip(1.0)), ("fsam", fsam_optax.fsam()))
  with pytest.raises(ValueError, match=r"fsam must be the first transformation.*entry 'fsam'"):
    fsam_optax.sam_value_and_grad(loss)(PARAMS, tx.init(PARAMS))


def test_fsam_inside_multisteps_says_to_accumulate_after_it():
  tx = optax.MultiSteps(optax.chain(fsam_optax.fsam(), optax.sgd(0.1)), every_k_schedule=2)
  with pytest.raises(ValueError, match=r"inside optax.MultiSteps.*MultiSteps\(base"):
    fsam_optax.sam_value_and_grad(loss)(PARAMS, tx.init(PARAMS))


def test_two_fsam_states_are_refused():
  tx = optax.chain(fsam_optax.fsam(), fsam_optax.sam())
  with pytest.raises(ValueError, match="holds 2 F-SAM states"):
    fsam_optax.sam_value_and_grad(loss)(PARAMS, tx.init(PARAMS))


def test_sam_gradients_fed_to_an_fsam_state_are_refused():
  sam_state = optax.chain(fsam_optax.sam(), optax.sgd(0.1)).init(PARAMS)
  _, grads = fsam_optax.sam_value_and_grad(loss)(PARAMS, sam_state)
  tx = optax.chain(fsam_optax.fsam(), optax.sgd(0.1))
  with pytest.raises(ValueError, match="carry no clean gradient"):
    tx.update(grads, tx.init(PARAMS), PARAMS)


def test_params_that_do_not_match_the_state_are_refused():
  tx = optax.chain(fsam_optax.fsam(), optax.sgd(0.1))
  other = {"w": jnp.zeros(3), "v": jnp.zeros(2)}
  with pytest.raises(ValueError, match="params have 2 leaves but the F-SAM state averages 1"):
    fsam_optax.sam_value_and_grad(lambda p: loss(p) + jnp.sum(p["v"]))(other, tx.init(PARAMS))


@pytest.mark.parametrize(
  "kwargs, error, message",
  [
    (dict(perturbation="local"), ValueError, "`perturbation` must be 'global' or 'per_device'"),
    (dict(perturbation="per_device"), ValueError, "needs `axis_name`"),
    (dict(clip_clean_grad=0.0), ValueError, "`clip_clean_grad` must be a norm > 0, got 0.0"),
  ],
)
def test_helper_arguments_are_checked(kwargs, error, message):
  with pytest.raises(error, match=message):
    fsam_optax.sam_value_and_grad(loss, **kwargs)


def test_helper_needs_a_callable():
  with pytest.raises(TypeError, match="`fun` must be callable"):
    fsam_optax.sam_value_and_grad(3.0)
