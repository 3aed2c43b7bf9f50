"""Non-finite gradients: a guarded step skips the batch and leaves everything untouched.

``fsam(..., skip_nonfinite=True)`` never folds a non-finite step into its
state, so ``optax.chain(fsam, optax.apply_if_finite(base))`` skips such a step entirely
(tests/test_wrappers.py checks it against a float64 reference). The other form,
``optax.apply_if_finite(optax.chain(fsam, base))``, cannot work (on a bad step
it returns zeros shaped like the (perturbed, clean) pairs, while the chain
returns plain updates) and the helper refuses it. Guarding the whole step by
hand works too; these tests pin these facts and what happens with no guard.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fsam_optax
from tests.train_step import sam_step

BAD_STEP = 2


def make_tx() -> optax.GradientTransformation:
  return optax.chain(fsam_optax.fsam(rho=0.2, sigma=1.0, lmbda=0.6), optax.sgd(0.05, momentum=0.9))


def init_params() -> dict[str, jax.Array]:
  k1, k2 = jax.random.split(jax.random.key(0))
  return {"w": jax.random.normal(k1, (3, 2)), "b": jax.random.normal(k2, (1, 2))}


def batch(step: int, bad: bool = False) -> tuple[jax.Array, jax.Array]:
  x = jax.random.normal(jax.random.fold_in(jax.random.key(1), step), (8, 3))
  # The bad batch makes only the bias's gradient NaN (0 * inf), not the rest.
  scale = jnp.array(jnp.inf if bad else 1.0)
  return x, scale


def loss_fn(params: dict[str, jax.Array], x: jax.Array, scale: jax.Array) -> jax.Array:
  out = x @ params["w"] + params["b"] * jnp.minimum(scale, 1.0)
  return jnp.mean(out**2) + 0.0 * jnp.sum(params["b"]) * scale


def test_bad_batch_makes_only_the_bias_gradient_nan():
  params = init_params()
  grads = jax.grad(loss_fn)(params, *batch(0, bad=True))
  assert np.all(np.isnan(grads["b"])) and np.all(np.isfinite(grads["w"]))


def test_guarded_step_skips_a_nonfinite_batch_and_training_continues():
  tx = make_tx()
  step = sam_step(tx, loss_fn, guard=True, outputs=("finite",))  # the README recipe
  params, state = init_params(), tx.init(init_params())
  skipped_params, skipped_state = params, state  # a run that never sees the bad batch
  for i in range(5):
    before = (params, state)
    params, state, finite = step(params, state, *batch(i, bad=i == BAD_STEP))
    assert bool(finite) == (i != BAD_STEP)
    if i == BAD_STEP:
      # Params, the EMA, the count and the momentum are all untouched.
      for x, y in zip(jax.tree.leaves((params, state)), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(x, y)
      assert int(state[0].count) == BAD_STEP
    else:
      skipped_params, skipped_state, _ = step(skipped_params, skipped_state, *batch(i))
  assert int(state[0].count) == 4
  # Afterwards, exactly the run that skipped the batch.
  for x, y in zip(
    jax.tree.leaves((params, state)), jax.tree.leaves((skipped_params, skipped_state)), strict=True
  ):
    np.testing.assert_array_equal(x, y)


def test_without_a_guard_nan_in_one_leaf_spreads_to_every_param_and_the_ema():
  """One NaN leaf poisons the global norm, hence everything."""
  tx = make_tx()
  step = sam_step(tx, loss_fn, outputs=("grads",))
  params, state = init_params(), tx.init(init_params())
  for i in range(BAD_STEP + 1):
    params, state, grads = step(params, state, *batch(i, bad=i == BAD_STEP))
  # The perturbation of every leaf is rho * d / ||d|| with ||d|| = NaN.
  assert all(
    np.all(np.isnan(g.perturbed))
    for g in jax.tree.leaves(grads, is_leaf=lambda x: isinstance(x, fsam_optax.SAMGrad))
  )
  assert all(np.all(np.isnan(x)) for x in jax.tree.leaves(params))
  assert all(np.all(np.isnan(x)) for x in jax.tree.leaves(state[1]))  # momentum
  # The EMA is fed the clean gradient: NaN only where that gradient was NaN ...
  ema = state[0].ema
  assert np.all(np.isnan(ema["b"])) and np.all(np.isfinite(ema["w"]))
  # ... until the next step, taken at NaN params, makes it NaN everywhere.
  _, state, _ = step(params, state, *batch(BAD_STEP + 1))
  assert all(np.all(np.isnan(x)) for x in jax.tree.leaves(state[0].ema))


def test_skip_nonfinite_keeps_fsam_state_while_the_params_still_take_the_nan():
  """skip_nonfinite protects fsam's state; the base optimizer needs its own guard."""
  tx = optax.chain(
    fsam_optax.fsam(rho=0.2, sigma=1.0, lmbda=0.6, skip_nonfinite=True),
    optax.sgd(0.05, momentum=0.9),
  )
  step = sam_step(tx, loss_fn)
  params, state = init_params(), tx.init(init_params())
  for i in range(BAD_STEP + 1):
    before = state[0]
    params, state = step(params, state, *batch(i, bad=i == BAD_STEP))
  assert all(np.all(np.isnan(x)) for x in jax.tree.leaves(params))
  # fsam kept its state: the moving average and the count are those before the step.
  for x, y in zip(jax.tree.leaves(state[0]), jax.tree.leaves(before), strict=True):
    np.testing.assert_array_equal(x, y)
  assert int(state[0].count) == BAD_STEP


def test_apply_if_finite_around_the_chain_is_refused_with_the_supported_form():
  params = init_params()
  tx = optax.apply_if_finite(make_tx(), max_consecutive_errors=3)
  grad_fn = fsam_optax.sam_value_and_grad(loss_fn)
  with pytest.raises(
    ValueError,
    match=r"inside optax.apply_if_finite.*`optax.chain\(fsam_optax.fsam\(...\), "
    r"optax.apply_if_finite\(base",
  ):
    grad_fn(params, tx.init(params), *batch(0))
