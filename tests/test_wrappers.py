"""Optax wrappers around or after fsam, non-finite guards and gradient accumulation.

The wrappers are checked against the float64 NumPy reference on
``tests.jax_mlp.quadratic_loss``, whose gradients are known in closed form;
``fsam_steps`` runs the algorithm on it in NumPy, with the base optimizer's step
given as a function where it is not plain SGD. Forms that cannot work are refused
by the helper with the supported form in the message.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fsam_optax
from tests.jax_mlp import max_abs_diff, mlp_loss, perturbed_grad, quadratic_loss
from tests.reference import FSAMReference, SGDReference, batches, fsam_steps, init_mlp
from tests.train_step import sam_step

HYPER = {"rho": 0.2, "sigma": 1.0, "lmbda": 0.6}
LR, MOMENTUM, STEPS = 0.1, 0.9, 6
# Sorted keys: jax's leaf order is the dicts' order, so NumPy lists line up.
SHAPES = {"b": (2,), "s": (), "w": (3, 2)}


def problem(seed: int = 0) -> tuple[dict, list[dict], dict]:
  rng = np.random.default_rng(seed)
  draw = lambda: {k: rng.normal(size=s) for k, s in SHAPES.items()}
  params, c = draw(), {k: 0.5 + np.abs(v) for k, v in draw().items()}
  return params, [draw() for _ in range(STEPS)], c


def leaves(tree: Any) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def reference(params, a_steps, c, **kwargs):
  values = lambda d: list(d.values())
  return fsam_steps(values(params), [values(a) for a in a_steps], values(c), **kwargs)


def train(tx, params, a_steps, c, *, fast=lambda p: p, **helper) -> list[tuple[Any, Any, Any]]:
  """Runs the helper and ``tx`` in float64; ``fast`` picks the params to perturb."""
  step = sam_step(tx, quadratic_loss, outputs=("grads",), at=fast, **helper)
  state, out = tx.init(params), []
  for a in a_steps:
    params, state, grads = step(params, state, a, c)
    out.append((params, state, grads))
  return out


def assert_close(got: Any, want: list[np.ndarray]) -> None:
  got = leaves(got)
  assert len(got) == len(want)
  for x, y in zip(got, want, strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-13)


def assert_matches(run, ref, fsam_state=lambda s: s[0], fast=lambda p: p) -> None:
  for (params, state, grads), want in zip(run, ref, strict=True):
    assert_close(fast(params), want.params)
    assert_close(fsam_optax.base_grads(grads), want.perturbed)
    if want.ema is not None:
      assert_close(fsam_state(state).ema, want.ema)


def test_apply_if_finite_after_fsam_skips_the_step_as_if_the_batch_never_came():
  params, a_steps, c = problem()
  bad = 3
  a_steps[bad] = {**a_steps[bad], "b": np.array([np.nan, 1.0])}
  tx = optax.chain(
    fsam_optax.fsam(**HYPER, skip_nonfinite=True), optax.apply_if_finite(optax.sgd(LR), 2)
  )
  with jax.enable_x64(True):
    run = train(tx, params, a_steps, c)
  # The bad step leaves params and the whole fsam state exactly as they were.
  (p_bad, s_bad, _), (p_before, s_before, _) = run[bad], run[bad - 1]
  for x, y in zip(leaves((p_bad, s_bad[0])), leaves((p_before, s_before[0])), strict=True):
    np.testing.assert_array_equal(x, y)
  assert int(s_bad[1].total_notfinite) == 1
  ref = reference(params, [a for i, a in enumerate(a_steps) if i != bad], c, **HYPER, lr=LR)
  good = run[:bad] + run[bad + 1 :]
  for (p, s, _), want in zip(good, ref, strict=True):
    assert_close(p, want.params)
    assert_close(s[0].ema, want.ema)
  assert int(run[-1][1][0].count) == STEPS - 1


def test_apply_if_finite_after_fsam_without_skip_nonfinite_is_refused():
  params, a_steps, c = problem()
  tx = optax.chain(fsam_optax.fsam(**HYPER), optax.apply_if_finite(optax.sgd(LR), 2))
  with pytest.raises(
    ValueError, match=r"store that step's non-finite values in its `ema`.*skip_nonfinite=True"
  ):
    fsam_optax.sam_value_and_grad(quadratic_loss)(params, tx.init(params), a_steps[0], c)


def test_named_chain_matches_the_reference():
  params, a_steps, c = problem()
  tx = optax.named_chain(("fsam", fsam_optax.fsam(**HYPER)), ("sgd", optax.sgd(LR)))
  with jax.enable_x64(True):
    run = train(tx, params, a_steps, c)
  assert_matches(run, reference(params, a_steps, c, **HYPER, lr=LR), lambda s: s["fsam"])


def test_clip_by_global_norm_after_fsam_clips_the_perturbed_gradient():
  params, a_steps, c = problem()
  max_norm = 0.5

  def clipped_sgd(theta, g_pert):
    n = np.sqrt(sum(np.sum(g**2) for g in g_pert.values()))
    assert n > max_norm  # the clip is active at every step
    return {k: theta[k] - LR * g_pert[k] * max_norm / n for k in theta}

  tx = optax.chain(fsam_optax.fsam(**HYPER), optax.clip_by_global_norm(max_norm), optax.sgd(LR))
  with jax.enable_x64(True):
    run = train(tx, params, a_steps, c)
  assert_matches(run, reference(params, a_steps, c, **HYPER, lr=LR, base=clipped_sgd))


def test_clip_clean_grad_clips_g_before_the_direction_and_the_moving_average():
  params, a_steps, c = problem()
  tx = optax.chain(fsam_optax.fsam(**HYPER), optax.sgd(LR))
  with jax.enable_x64(True):
    run = train(tx, params, a_steps, c, clip_clean_grad=0.5)
  ref = reference(params, a_steps, c, **HYPER, lr=LR, clip_clean=0.5)
  assert_matches(run, ref)
  # The average (checked above) was fed the clipped g: its norm is the clip's.
  for want in ref:
    assert np.sqrt(sum(np.sum(g**2) for g in want.clean)) == pytest.approx(0.5)


RHO = optax.linear_schedule(0.3, 0.05, transition_steps=STEPS)
SIGMA = optax.linear_schedule(1.0, 0.4, transition_steps=STEPS)
LMBDA = optax.linear_schedule(0.5, 0.9, transition_steps=STEPS)


def test_inject_hyperparams_schedules_reach_the_helper_one_step_late():
  """The helper reads rho, sigma and lmbda from the hyperparameters that
  inject_hyperparams stored at the previous update (the rules run in the helper)."""
  params, a_steps, c = problem()
  tx = optax.chain(
    optax.inject_hyperparams(fsam_optax.fsam)(rho=RHO, sigma=SIGMA, lmbda=LMBDA), optax.sgd(LR)
  )
  with jax.enable_x64(True):
    run = train(tx, params, a_steps, c)
    # What inject_hyperparams stored: at init, then after each update (float32).
    stored = [tx.init(params)[0].hyperparams] + [state[0].hyperparams for _, state, _ in run]
    stored = [{k: float(v) for k, v in h.items()} for h in stored]
  for i in range(STEPS):  # after update i, the schedules' values at step i
    for name, schedule in (("rho", RHO), ("sigma", SIGMA), ("lmbda", LMBDA)):
      assert stored[i + 1][name] == pytest.approx(float(schedule(i)), rel=1e-6)
  hyper = lambda lag: [
    {
      "rho": stored[i + 1 - lag]["rho"],
      "sigma": stored[i + 1 - lag]["sigma"],
      "lmbda": stored[i + 1 - lag]["lmbda"],
    }
    for i in range(STEPS)
  ]
  ref = reference(params, a_steps, c, **HYPER, lr=LR, per_step=hyper(lag=1))
  assert_matches(run, ref, lambda s: s[0].inner_state)
  # Not the on-time schedule: the lag is real.
  on_time = reference(params, a_steps, c, **HYPER, lr=LR, per_step=hyper(lag=0))
  assert not np.allclose(leaves(run[-1][0])[-1], on_time[-1].params[-1], rtol=1e-6)


def test_rho_schedule_given_to_fsam_has_no_lag():
  params, a_steps, c = problem()
  tx = optax.chain(fsam_optax.fsam(RHO, sigma=1.0, lmbda=0.6), optax.sgd(LR))
  with jax.enable_x64(True):
    run = train(tx, params, a_steps, c)
    per_step = [{"rho": float(RHO(i))} for i in range(STEPS)]
  assert_matches(run, reference(params, a_steps, c, **HYPER, lr=LR, per_step=per_step))


def test_inject_hyperparams_value_set_by_hand_takes_effect_at_the_next_step():
  params, a_steps, c = problem()
  tx = optax.chain(optax.inject_hyperparams(fsam_optax.fsam)(**HYPER), optax.sgd(LR))
  step = sam_step(tx, quadratic_loss)
  with jax.enable_x64(True):
    state, p, got = tx.init(params), params, []
    for i, a in enumerate(a_steps):
      if i == 2:
        state[0].hyperparams.update(
          rho=jnp.asarray(0.05), sigma=jnp.asarray(0.5), lmbda=jnp.asarray(0.8)
        )
      p, state = step(p, state, a, c)
      got.append(p)
  per_step = [{} if i < 2 else {"rho": 0.05, "sigma": 0.5, "lmbda": 0.8} for i in range(STEPS)]
  ref = reference(params, a_steps, c, **HYPER, lr=LR, per_step=per_step)
  for x, want in zip(got, ref, strict=True):
    assert_close(x, want.params)


def test_lookahead_around_the_chain_perturbs_the_fast_weights():
  params, a_steps, c = problem()
  sync, alpha = 2, 0.5
  slow, count = dict(enumerate(params.values())), [0]

  def sgd_then_lookahead(fast, g_pert):
    fast = {k: fast[k] - LR * g_pert[k] for k in fast}
    count[0] += 1
    if count[0] % sync == 0:
      slow.update({k: slow[k] + alpha * (fast[k] - slow[k]) for k in fast})
      fast = dict(slow)
    return fast

  tx = optax.lookahead(
    optax.chain(fsam_optax.fsam(**HYPER), optax.sgd(LR)), sync_period=sync, slow_step_size=alpha
  )
  with jax.enable_x64(True):
    start = optax.LookaheadParams.init_synced(jax.tree.map(jnp.asarray, params))
    run = train(tx, start, a_steps, c, fast=lambda p: p.fast)
  ref = reference(params, a_steps, c, **HYPER, lr=LR, base=sgd_then_lookahead)
  assert_matches(run, ref, lambda s: s.fast_state[0], fast=lambda p: p.fast)
  assert_close(run[-1][0].slow, list(slow.values()))


def test_multi_transform_after_fsam_freezes_leaves_and_fsam_mask_spares_them():
  params, a_steps, c = problem()
  labels = {"b": "frozen", "s": "sgd", "w": "sgd"}
  tx = optax.chain(
    fsam_optax.fsam(**HYPER, mask={"b": False, "s": True, "w": True}),
    optax.multi_transform({"sgd": optax.sgd(LR), "frozen": optax.set_to_zero()}, labels),
  )
  # Leaf 0 is "b".
  frozen_b = lambda theta, g: {k: theta[k] - (0 if k == 0 else LR) * g[k] for k in theta}
  with jax.enable_x64(True):
    run = train(tx, params, a_steps, c)
  ref = reference(params, a_steps, c, **HYPER, lr=LR, mask=[False, True, True], base=frozen_b)
  assert_matches(run, ref)
  np.testing.assert_array_equal(run[-1][0]["b"], params["b"])


@pytest.mark.parametrize(
  "wrap",
  [
    lambda tx: optax.masked(tx, {"b": False, "s": True, "w": True}),
    lambda tx: optax.multi_transform(
      {"a": tx, "z": optax.set_to_zero()}, {"b": "z", "s": "a", "w": "a"}
    ),
  ],
  ids=["masked", "multi_transform"],
)
def test_fsam_inside_masked_or_multi_transform_is_refused_with_the_supported_form(wrap):
  params, a_steps, c = problem()
  tx = wrap(optax.chain(fsam_optax.fsam(**HYPER), optax.sgd(LR)))
  with pytest.raises(ValueError, match=r"own `mask=`.*optax.chain\(fsam_optax.fsam\(mask=...\), "):
    fsam_optax.sam_value_and_grad(quadratic_loss)(params, tx.init(params), a_steps[0], c)


# ---- non-finite gradients ----
# ``fsam(..., skip_nonfinite=True)`` never folds a non-finite step into its state, so
# ``optax.chain(fsam, optax.apply_if_finite(base))`` skips such a step entirely (above).
# ``optax.apply_if_finite(optax.chain(fsam, base))`` cannot work (on a bad step it returns
# zeros shaped like the (perturbed, clean) pairs, while the chain returns plain updates)
# and the helper refuses it. Guarding the whole step by hand works too.

BAD_STEP = 2


def make_tx(**options) -> optax.GradientTransformation:
  return optax.chain(fsam_optax.fsam(**HYPER, **options), optax.sgd(0.05, momentum=MOMENTUM))


def with_a_bad_batch(a_steps: list[dict]) -> list[dict]:
  """Step BAD_STEP's batch makes only the bias's gradient ``a + c * p`` NaN, not the rest."""
  return [{**a, "b": np.full(2, np.nan)} if i == BAD_STEP else a for i, a in enumerate(a_steps)]


def test_bad_batch_makes_only_the_bias_gradient_nan():
  params, a_steps, c = problem()
  grads = jax.grad(quadratic_loss)(params, with_a_bad_batch(a_steps)[BAD_STEP], c)
  assert np.all(np.isnan(grads["b"]))
  assert np.all(np.isfinite(grads["s"])) and np.all(np.isfinite(grads["w"]))


def test_guarded_step_skips_a_nonfinite_batch_and_training_continues():
  params, a_steps, c = problem()
  tx = make_tx()
  step = sam_step(tx, quadratic_loss, guard=True, outputs=("finite",))  # the README recipe
  state = tx.init(params)
  skipped_params, skipped_state = params, state  # a run that never sees the bad batch
  for i, a in enumerate(with_a_bad_batch(a_steps)[:5]):
    before = (params, state)
    params, state, finite = step(params, state, a, c)
    assert bool(finite) == (i != BAD_STEP)
    if i == BAD_STEP:
      chex.assert_trees_all_equal((params, state), before)  # the EMA, count, momentum too
      assert int(state[0].count) == BAD_STEP
    else:
      skipped_params, skipped_state, _ = step(skipped_params, skipped_state, a, c)
  assert int(state[0].count) == 4
  # Afterwards, exactly the run that skipped the batch.
  chex.assert_trees_all_equal((params, state), (skipped_params, skipped_state))


def test_without_a_guard_nan_in_one_leaf_spreads_to_every_param_and_the_ema():
  """One NaN leaf poisons the global norm, hence everything."""
  params, a_steps, c = problem()
  tx = make_tx()
  step = sam_step(tx, quadratic_loss, outputs=("grads",))
  state = tx.init(params)
  for a in with_a_bad_batch(a_steps)[: BAD_STEP + 1]:
    params, state, grads = step(params, state, a, c)
  # The perturbation of every leaf is rho * d / ||d|| with ||d|| = NaN.
  assert all(np.all(np.isnan(x)) for x in jax.tree.leaves(fsam_optax.base_grads(grads)))
  assert all(np.all(np.isnan(x)) for x in jax.tree.leaves(params))
  assert all(np.all(np.isnan(x)) for x in jax.tree.leaves(state[1]))  # momentum
  # The EMA is fed the clean gradient: NaN only where that gradient was NaN ...
  ema = state[0].ema
  assert (
    np.all(np.isnan(ema["b"])) and np.all(np.isfinite(ema["s"])) and np.all(np.isfinite(ema["w"]))
  )
  # ... until the next step, taken at NaN params, makes it NaN everywhere.
  _, state, _ = step(params, state, a_steps[BAD_STEP + 1], c)
  assert all(np.all(np.isnan(x)) for x in jax.tree.leaves(state[0].ema))


def test_skip_nonfinite_keeps_fsam_state_while_the_params_still_take_the_nan():
  """skip_nonfinite protects fsam's state; the base optimizer needs its own guard."""
  params, a_steps, c = problem()
  tx = make_tx(skip_nonfinite=True)
  step = sam_step(tx, quadratic_loss)
  state = tx.init(params)
  for a in with_a_bad_batch(a_steps)[: BAD_STEP + 1]:
    before = state[0]
    params, state = step(params, state, a, c)
  assert all(np.all(np.isnan(x)) for x in jax.tree.leaves(params))
  # fsam kept its state: the moving average and the count are those before the step.
  chex.assert_trees_all_equal(state[0], before)
  assert int(state[0].count) == BAD_STEP


def test_apply_if_finite_around_the_chain_is_refused_with_the_supported_form():
  params, a_steps, c = problem()
  tx = optax.apply_if_finite(make_tx(), max_consecutive_errors=3)
  grad_fn = fsam_optax.sam_value_and_grad(quadratic_loss)
  with pytest.raises(
    ValueError,
    match=r"inside optax.apply_if_finite.*`optax.chain\(fsam_optax.fsam\(...\), "
    r"optax.apply_if_finite\(base",
  ):
    grad_fn(params, tx.init(params), a_steps[0], c)


# ---- gradient accumulation: optax.MultiSteps after fsam, never around it ----
# Each micro-batch is perturbed with its own gradient and feeds the moving average; the
# base optimizer steps once per k micro-batches with the mean g', and the chain gives
# exact zeros in between.

K = 2
MICRO_STEPS = 3 * K


def test_multisteps_after_fsam_steps_every_k_micro_batches_with_mean_perturbed_gradient():
  data = batches(seed=13, steps=MICRO_STEPS, batch=8)
  opt, sgd = FSAMReference(**HYPER), SGDReference(LR, MOMENTUM, weight_decay=0.0)
  theta, pending = init_mlp(0), []
  with jax.enable_x64(True):
    # MultiSteps accumulates in float32 unless told otherwise (and
    # canonicalises float64 to float32 outside the x64 context).
    base = optax.MultiSteps(
      optax.sgd(LR, momentum=MOMENTUM), every_k_schedule=K, accumulator_dtype=jnp.float64
    )
    tx = optax.chain(fsam_optax.fsam(**HYPER), base.gradient_transformation())
    step = sam_step(tx, mlp_loss, outputs=("updates",))
    params = jax.tree.map(jnp.asarray, theta)
    opt_state = tx.init(params)
    for i, (x, y) in enumerate(data, start=1):
      params, opt_state, updates = step(params, opt_state, x, y)
      # By hand: every micro-batch is perturbed at the same theta and feeds the EMA.
      pending.append(perturbed_grad(opt, theta, x, y))
      if i % K:
        assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
      else:
        theta = sgd.step(theta, {k: np.mean([g[k] for g in pending], axis=0) for k in theta})
        pending = []
        assert any(bool(jnp.any(u != 0)) for u in jax.tree.leaves(updates))
      assert max_abs_diff(params, theta) < 1e-12
    assert int(opt_state[0].count) == MICRO_STEPS


def test_multisteps_around_fsam_raises_with_the_fix():
  tx = optax.MultiSteps(optax.chain(fsam_optax.fsam(), optax.sgd(LR)), every_k_schedule=K)
  params = jax.tree.map(jnp.asarray, init_mlp(0))
  x, y = batches(seed=14, steps=1)[0]
  grad_fn = fsam_optax.sam_value_and_grad(mlp_loss)
  fix = r"inside optax\.MultiSteps.*MultiSteps\(base.*gradient_transformation\(\)"
  with pytest.raises(ValueError, match=fix):
    grad_fn(params, tx.init(params), x, y)
