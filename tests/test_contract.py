"""The optax contrib contract, adapted to a two-pass optimizer."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fsam_optax

TARGET = jnp.array([1.0, -2.0, 3.0])


def parabola(params, scale=1.0):
  return scale * jnp.sum((params["w"] - TARGET) ** 2) + jnp.sum(params["b"] ** 2)


def init_params(dtype=jnp.float32):
  return {"w": jnp.zeros(3, dtype), "b": jnp.ones((2,), dtype)}


def make_step(tx, loss=parabola):
  grad_fn = fsam_optax.sam_value_and_grad(loss)

  def step(params, opt_state):
    value, grads = grad_fn(params, opt_state)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  return step


def run(tx, steps=5, dtype=jnp.float32):
  params = init_params(dtype)
  opt_state = tx.init(params)
  step = jax.jit(make_step(tx))
  for _ in range(steps):
    params, opt_state, _ = step(params, opt_state)
  return params, opt_state


def fsam_chain(**kwargs):
  return optax.chain(fsam_optax.fsam(rho=0.2, sigma=1.0, lmbda=0.6, **kwargs), optax.sgd(0.05))


def test_update_accepts_unknown_extra_args():
  tx = fsam_chain()
  params = init_params()
  opt_state = tx.init(params)
  _, grads = fsam_optax.sam_value_and_grad(parabola)(params, opt_state)
  plain, _ = tx.update(grads, opt_state, params)
  extra, _ = tx.update(grads, opt_state, params, value=1.0, unknown_thing="x")
  chex.assert_trees_all_equal(plain, extra)


def test_second_jitted_step_does_not_recompile():
  tx = fsam_chain()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, opt_state):
    return make_step(tx)(params, opt_state)

  params = init_params()
  opt_state = tx.init(params)
  for _ in range(3):
    params, opt_state, _ = step(params, opt_state)


@pytest.mark.parametrize("hparams", [dict(rho=0.2, sigma=1.0, lmbda=0.6), dict(rho=0.1, sigma=0.0)])
def test_inject_hyperparams_equals_plain(hparams):
  plain = optax.chain(fsam_optax.fsam(**hparams), optax.sgd(0.05, momentum=0.9))
  injected = optax.chain(
    optax.inject_hyperparams(fsam_optax.fsam)(**hparams), optax.sgd(0.05, momentum=0.9)
  )
  want, _ = run(plain, steps=8)
  got, state = run(injected, steps=8)
  chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)
  assert set(state[0].hyperparams) == {"rho", "sigma", "lmbda", "eps"}


def test_inject_hyperparams_value_set_by_user_reaches_the_next_perturbation():
  tx = optax.chain(optax.inject_hyperparams(fsam_optax.fsam)(rho=0.2), optax.sgd(0.05))
  params = init_params()
  opt_state = tx.init(params)
  grad_fn = fsam_optax.sam_value_and_grad(parabola, return_diagnostics=True)
  _, _, diag = grad_fn(params, opt_state)
  np.testing.assert_allclose(diag.perturbation_norm, 0.2, rtol=1e-6)
  opt_state[0].hyperparams["rho"] = jnp.asarray(0.0)
  _, grads, diag = grad_fn(params, opt_state)
  assert float(diag.perturbation_norm) == 0.0
  chex.assert_trees_all_equal(
    jax.tree.map(lambda g: g.perturbed, grads, is_leaf=lambda x: isinstance(x, fsam_optax.SAMGrad)),
    jax.grad(parabola)(params),
  )


@pytest.mark.parametrize("adaptive", [False, True])
def test_bfloat16_params_give_bfloat16_updates_and_float32_norms(adaptive):
  tx = fsam_chain(adaptive=adaptive)
  params = init_params(jnp.bfloat16)
  opt_state = tx.init(params)
  _, grads, diag = fsam_optax.sam_value_and_grad(parabola, return_diagnostics=True)(
    params, opt_state
  )
  updates, opt_state = tx.update(grads, opt_state, params)
  assert {x.dtype for x in jax.tree.leaves(grads)} == {jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for x in jax.tree.leaves(updates)} == {jnp.dtype(jnp.bfloat16)}
  # The moving average is kept in float32, where (1 - lmbda) g does not round away.
  assert {x.dtype for x in jax.tree.leaves(opt_state[0].ema)} == {jnp.dtype(jnp.float32)}
  assert diag.direction_norm.dtype == jnp.float32
  assert diag.perturbation_norm.dtype == jnp.float32


def test_state_survives_scan_and_matches_the_python_loop():
  tx = fsam_chain()
  want, want_state = run(tx, steps=6)
  step = make_step(tx)
  params = init_params()

  def body(carry, _):
    params, opt_state, _ = step(*carry)
    return (params, opt_state), None

  (got, got_state), _ = jax.lax.scan(body, (params, tx.init(params)), length=6)
  chex.assert_trees_all_close(got, want, rtol=1e-6)
  assert jax.tree.structure(got_state) == jax.tree.structure(want_state)


def test_state_structure_and_dtypes_are_stable_under_cond():
  tx = fsam_chain()
  grad_fn = fsam_optax.sam_value_and_grad(parabola)

  @jax.jit
  def step(params, opt_state, flag):
    _, grads = grad_fn(params, opt_state)
    updates, opt_state = jax.lax.cond(
      flag,
      lambda: tx.update(grads, opt_state, params),
      lambda: (jax.tree.map(jnp.zeros_like, params), opt_state),
    )
    return optax.apply_updates(params, updates), opt_state

  params = init_params()
  opt_state = tx.init(params)
  for flag in (True, False, True):
    new_params, new_state = step(params, opt_state, flag)
    chex.assert_trees_all_equal_shapes_and_dtypes(new_state, opt_state)
    params, opt_state = new_params, new_state
  assert int(opt_state[0].count) == 2


def test_map_params_reaches_the_moving_average():
  tx = fsam_chain()
  params = init_params()
  opt_state = tx.init(params)
  mapped = optax.tree.map_params(tx, lambda v: v + 1.0, opt_state)
  chex.assert_trees_all_equal(mapped[0].ema, jax.tree.map(jnp.ones_like, params))
  assert int(mapped[0].count) == 0


def test_converges_inside_scan():
  # ||e|| stays rho, so the iterates settle within about rho of the minimum.
  tx = optax.chain(fsam_optax.fsam(rho=0.01, sigma=1.0, lmbda=0.9), optax.sgd(0.05, momentum=0.5))
  params = init_params()
  step = make_step(tx)
  (params, _), _ = jax.lax.scan(
    lambda c, _: (step(*c)[:2], None), (params, tx.init(params)), length=500
  )
  chex.assert_trees_all_close(params, {"w": TARGET, "b": jnp.zeros(2)}, atol=0.01)


def test_zero_gradient_and_zero_direction_give_finite_updates():
  tx = optax.chain(fsam_optax.fsam(rho=0.2, sigma=1.0, lmbda=0.0), optax.sgd(0.0))
  params = init_params()
  opt_state = tx.init(params)
  grad_fn = fsam_optax.sam_value_and_grad(lambda p: 0.0 * parabola(p), return_diagnostics=True)
  _, grads, diag = grad_fn(params, opt_state)
  updates, opt_state = tx.update(grads, opt_state, params)
  assert float(diag.direction_norm) == 0.0 and float(diag.perturbation_norm) == 0.0
  assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))

  # With lmbda = 0 and a learning rate of 0, step 2 sees m = g exactly: d = 0.
  grad_fn = fsam_optax.sam_value_and_grad(parabola, return_diagnostics=True)
  _, grads, _ = grad_fn(params, opt_state)
  _, opt_state = tx.update(grads, opt_state, params)
  _, grads, diag = grad_fn(params, opt_state)
  updates, _ = tx.update(grads, opt_state, params)
  assert float(diag.direction_norm) == 0.0
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


def test_sam_keeps_no_moving_average_buffer():
  params = init_params()
  assert fsam_optax.sam(0.1).init(params).ema is None
  assert fsam_optax.fsam(0.1, sigma=0).init(params).ema is None
  state = fsam_optax.fsam(0.1).init(params)
  chex.assert_trees_all_equal_shapes_and_dtypes(state.ema, params)


def test_diagnostics_are_the_losses_and_norms_of_the_two_passes():
  tx = fsam_chain()  # rho 0.2
  params = init_params()
  grad_fn = fsam_optax.sam_value_and_grad(parabola, return_diagnostics=True)
  value, _, diag = grad_fn(params, tx.init(params))
  # First step: e = rho * g / ||g||, with the parabola's gradient written out by hand.
  g = {"w": 2 * (params["w"] - TARGET), "b": 2 * params["b"]}
  norm = jnp.sqrt(sum(jnp.sum(x**2) for x in g.values()))
  perturbed = {k: params[k] + 0.2 * g[k] / norm for k in params}
  clean_loss, perturbed_loss = float(parabola(params)), float(parabola(perturbed))
  assert float(value) == float(diag.value) == clean_loss
  np.testing.assert_allclose(float(diag.perturbed_value), perturbed_loss, rtol=1e-6)
  np.testing.assert_allclose(float(diag.sharpness), perturbed_loss - clean_loss, rtol=1e-5)
  np.testing.assert_allclose(float(diag.direction_norm), float(norm), rtol=1e-6)
  np.testing.assert_allclose(float(diag.perturbation_norm), 0.2, rtol=1e-6)
