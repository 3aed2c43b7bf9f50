"""``fsam`` and ``sam`` as Optax transformations: the optax contrib contract (adapted to a
two-pass optimizer), the state, ``mask`` and bit-identical reruns.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

import fsam_optax
from tests.jax_mlp import quadratic_loss
from tests.reference import fsam_steps
from tests.train_step import sam_step

TARGET = jnp.array([1.0, -2.0, 3.0])
LR = 0.1
HYPER = {"rho": 0.2, "sigma": 1.0, "lmbda": 0.6}


def parabola(params):
  return jnp.sum((params["w"] - TARGET) ** 2) + jnp.sum(params["b"] ** 2)


def init_params(dtype=jnp.float32):
  return {"w": jnp.zeros(3, dtype), "b": jnp.ones((2,), dtype)}


def run(tx, steps):
  params = init_params()
  opt_state = tx.init(params)
  step = sam_step(tx, parabola)
  for _ in range(steps):
    params, opt_state = step(params, opt_state)
  return params, opt_state


def fsam_chain(**kwargs):
  return optax.chain(fsam_optax.fsam(**HYPER, **kwargs), optax.sgd(0.05))


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
  step = jax.jit(chex.assert_max_traces(sam_step(tx, parabola, jit=False), n=1))
  params = init_params()
  opt_state = tx.init(params)
  for _ in range(3):
    params, opt_state = step(params, opt_state)


@pytest.mark.parametrize("hparams", [dict(rho=0.2, sigma=1.0, lmbda=0.6), dict(rho=0.1, sigma=0.0)])
def test_inject_hyperparams_equals_plain(hparams):
  plain = optax.chain(fsam_optax.fsam(**hparams), optax.sgd(0.05, momentum=0.9))
  injected = optax.chain(
    optax.inject_hyperparams(fsam_optax.fsam)(**hparams), optax.sgd(0.05, momentum=0.9)
  )
  want, _ = run(plain, 8)
  got, state = run(injected, 8)
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
  chex.assert_trees_all_equal(fsam_optax.base_grads(grads), jax.grad(parabola)(params))


@pytest.mark.parametrize("adaptive", [False, True])
def test_bfloat16_params_give_bfloat16_updates_and_float32_norms(adaptive):
  tx = fsam_chain(adaptive=adaptive)
  params = init_params(jnp.bfloat16)
  step = sam_step(tx, parabola, outputs=("grads", "updates", "diag"), jit=False)
  _, opt_state, grads, updates, diag = step(params, tx.init(params))
  assert {x.dtype for x in jax.tree.leaves(fsam_optax.base_grads(grads))} == {
    jnp.dtype(jnp.bfloat16)
  }
  assert {x.dtype for x in jax.tree.leaves(updates)} == {jnp.dtype(jnp.bfloat16)}
  # The moving average is kept in float32, where (1 - lmbda) g does not round away.
  assert {x.dtype for x in jax.tree.leaves(opt_state[0].ema)} == {jnp.dtype(jnp.float32)}
  assert diag.direction_norm.dtype == jnp.float32
  assert diag.perturbation_norm.dtype == jnp.float32


def test_state_survives_scan_and_matches_the_python_loop():
  tx = fsam_chain()
  want, want_state = run(tx, 6)
  step = sam_step(tx, parabola, jit=False)
  params = init_params()
  (got, got_state), _ = jax.lax.scan(
    lambda carry, _: (step(*carry), None), (params, tx.init(params)), length=6
  )
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
  step = sam_step(tx, parabola, jit=False)
  (params, _), _ = jax.lax.scan(
    lambda c, _: (step(*c), None), (params, tx.init(params)), length=500
  )
  chex.assert_trees_all_close(params, {"w": TARGET, "b": jnp.zeros(2)}, atol=0.01)


def test_zero_gradient_and_zero_direction_give_finite_updates():
  tx = optax.chain(fsam_optax.fsam(rho=0.2, sigma=1.0, lmbda=0.0), optax.sgd(0.0))
  step = lambda loss: sam_step(tx, loss, outputs=("updates", "diag"), jit=False)
  params = init_params()
  params, opt_state, updates, diag = step(lambda p: 0.0 * parabola(p))(params, tx.init(params))
  assert float(diag.direction_norm) == 0.0 and float(diag.perturbation_norm) == 0.0
  assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))

  # With lmbda = 0 and a learning rate of 0, step 2 sees m = g exactly: d = 0.
  params, opt_state, *_ = step(parabola)(params, opt_state)
  _, _, updates, diag = step(parabola)(params, opt_state)
  assert float(diag.direction_norm) == 0.0
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


# ---- mask: excluded leaves are not perturbed and are left out of the norm ----
# The params mimic a conv net with BatchNorm: kernels, biases, BN scales/biases. The loss
# is separable, so an unperturbed leaf's perturbed gradient must equal its clean gradient
# exactly.


def _params(seed: int) -> dict[str, Any]:
  rng = np.random.default_rng(seed)
  shapes = {
    "conv": {"kernel": (3, 3, 2, 4), "bias": (4,)},
    "bn": {"scale": (4,), "bias": (4,)},
    "dense": {"kernel": (4, 3), "bias": (3,)},
  }
  return jax.tree.map(
    lambda s: jnp.asarray(rng.normal(size=s)), shapes, is_leaf=lambda x: isinstance(x, tuple)
  )


def _kernels_only(params: Any) -> Any:
  """Optax-style mask: perturb kernels, not BatchNorm scales or any bias."""
  return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "kernel", params)


PREFIX_MASK = {
  "conv": {"kernel": True, "bias": False},
  "bn": False,
  "dense": {"kernel": True, "bias": False},
}


def _run(mask: Any, adaptive: bool = False) -> list[tuple]:
  params, a1, c = _params(0), _params(1), jax.tree.map(lambda x: 0.1 * jnp.abs(x), _params(2))
  tx = optax.chain(fsam_optax.fsam(**HYPER, adaptive=adaptive, mask=mask), optax.sgd(LR))
  state = tx.init(params)
  step = sam_step(tx, quadratic_loss, outputs=("grads", "diag"))
  out = []
  for a in [a1, jax.tree.map(jnp.negative, a1)]:
    clean = jax.grad(quadratic_loss)(params, a, c)
    params, state, grads, diag = step(params, state, a, c)
    # What the base optimizer received, and the clean gradient g of the same step.
    out.append((params, state[0], (fsam_optax.base_grads(grads), clean), diag))
  return out


def _reference(mask_leaves: list[bool] | None, adaptive: bool = False) -> list:
  params, a1, c = _params(0), _params(1), jax.tree.map(lambda x: 0.1 * jnp.abs(x), _params(2))
  leaves = lambda t: [np.asarray(x) for x in jax.tree.leaves(t)]
  a_steps = [leaves(a1), [-x for x in leaves(a1)]]
  return fsam_steps(
    leaves(params), a_steps, leaves(c), **HYPER, lr=LR, adaptive=adaptive, mask=mask_leaves
  )


@pytest.mark.parametrize("adaptive", [False, True])
def test_masked_run_matches_reference_with_norm_over_perturbed_leaves(adaptive):
  keep = jax.tree.leaves(_kernels_only(_params(0)))
  assert keep.count(True) == 2 and keep.count(False) == 4
  got, ref = _run(_kernels_only, adaptive=adaptive), _reference(keep, adaptive)
  unmasked = _reference(None, adaptive)
  for (params, state, _, diag), step, full in zip(got, ref, unmasked, strict=True):
    # The norm covers the two kernels only, and differs from the all-leaf norm.
    np.testing.assert_allclose(float(diag.direction_norm), step.direction_norm, rtol=1e-6)
    assert abs(step.direction_norm - full.direction_norm) > 1e-2 * full.direction_norm
    for x, r in zip(jax.tree.leaves(params), step.params, strict=True):
      np.testing.assert_allclose(np.asarray(x), r, rtol=1e-5, atol=1e-6)
    # The moving average still covers the masked-out leaves.
    for x, r in zip(jax.tree.leaves(state.ema), step.ema, strict=True):
      np.testing.assert_allclose(np.asarray(x), r, rtol=1e-5, atol=1e-6)
  assert not np.allclose(ref[-1].params[0], unmasked[-1].params[0])


def test_masked_out_leaves_get_their_clean_gradient_exactly():
  (_, _, (base, clean), diag), _ = _run(_kernels_only)
  for (path, got), g in zip(
    jax.tree_util.tree_leaves_with_path(base), jax.tree.leaves(clean), strict=True
  ):
    if path[-1].key == "kernel":
      assert not np.array_equal(got, g)
    else:
      np.testing.assert_array_equal(got, g)
  # Non-adaptive e has norm rho over the perturbed leaves alone.
  np.testing.assert_allclose(float(diag.perturbation_norm), HYPER["rho"], rtol=1e-6)


def test_prefix_callable_and_full_masks_give_identical_results():
  full = _kernels_only(_params(0))
  runs = [_run(m) for m in (PREFIX_MASK, _kernels_only, full)]
  for other in runs[1:]:
    for x, y in zip(jax.tree.leaves(runs[0]), jax.tree.leaves(other), strict=True):
      np.testing.assert_array_equal(x, y)


def test_all_true_mask_equals_no_mask_and_all_false_mask_is_plain_gradient():
  no_mask, all_true = _run(None), _run(True)
  for x, y in zip(jax.tree.leaves(no_mask), jax.tree.leaves(all_true), strict=True):
    np.testing.assert_array_equal(x, y)
  (_, _, (base, clean), diag), _ = _run(False)
  # Nothing perturbed: a zero norm, no NaN, and g' = g everywhere.
  assert float(diag.direction_norm) == 0.0 and float(diag.perturbation_norm) == 0.0
  for got, g in zip(jax.tree.leaves(base), jax.tree.leaves(clean), strict=True):
    np.testing.assert_array_equal(got, g)


def test_mask_works_under_inject_hyperparams():
  params = _params(0)
  tx = optax.chain(
    optax.inject_hyperparams(fsam_optax.fsam)(**HYPER, mask=PREFIX_MASK), optax.sgd(LR)
  )
  a, c = _params(1), jax.tree.map(jnp.ones_like, params)
  _, grads = fsam_optax.sam_value_and_grad(quadratic_loss)(params, tx.init(params), a, c)
  base, clean = fsam_optax.base_grads(grads), jax.grad(quadratic_loss)(params, a, c)
  np.testing.assert_array_equal(base["bn"]["scale"], clean["bn"]["scale"])
  assert not np.array_equal(base["conv"]["kernel"], clean["conv"]["kernel"])


STRUCTURE_ERROR = r"fsam: `mask` must have the structure of the params \(or a prefix of it\)"


@pytest.mark.parametrize(
  "mask",
  [
    {"conv": True, "bn": False},  # a key missing
    {"conv": True, "bn": False, "dense": True, "head": False},  # an extra key
    {"conv": {"kernel": {"w": True}, "bias": True}, "bn": True, "dense": True},  # too deep
    [True, False, True],  # a list for a dict
  ],
)
def test_mask_of_wrong_structure_is_rejected_at_init(mask):
  with pytest.raises(ValueError, match=STRUCTURE_ERROR):
    fsam_optax.fsam(mask=mask).init(_params(0))


def test_callable_mask_of_wrong_structure_is_rejected_at_init_with_the_same_message():
  tx = fsam_optax.fsam(mask=lambda p: {"conv": True})
  with pytest.raises(ValueError, match=STRUCTURE_ERROR):
    tx.init(_params(0))


def test_callable_mask_is_resolved_once_at_init_into_one_bool_per_leaf():
  params = _params(0)
  state = fsam_optax.fsam(mask=_kernels_only).init(params)
  assert state.config.mask == tuple(jax.tree.leaves(_kernels_only(params)))
  assert state.config == fsam_optax.fsam(mask=PREFIX_MASK).init(params).config


def test_state_resolved_for_other_params_is_refused_by_the_helper():
  params = _params(0)
  state = fsam_optax.fsam(mask=PREFIX_MASK, sigma=0.0).init(params)
  fewer = {"conv": params["conv"], "bn": params["bn"]}
  with pytest.raises(ValueError, match=r"covers 6 parameter leaves but the params have 4"):
    fsam_optax.sam_value_and_grad(quadratic_loss)(fewer, state, fewer, fewer)


def test_traced_mask_leaves_are_rejected():
  def build(flag: jax.Array) -> jax.Array:
    fsam_optax.fsam(mask={"w": flag})
    return flag

  with pytest.raises(ValueError, match=r"fsam: `mask` leaves must be concrete Python bools"):
    jax.jit(build)(jnp.array(True))


def test_elementwise_mask_array_is_rejected_with_what_to_do():
  with pytest.raises(ValueError, match=r"one per parameter leaf.*mask whole arrays, not elements"):
    fsam_optax.fsam(mask={"w": jnp.array([True, False])})


# ---- two runs with the same seeds give bit-identical results on CPU ----
# Each run builds its own optimizer and its own jitted step, so nothing is shared between
# them but the seeds.


def loss_fn(params: dict[str, jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  return jnp.mean((h @ params["w2"] - y) ** 2)


def seeded_run(seed: int, sharded: bool) -> list[jax.Array]:
  """Six F-SAM + AdamW steps on data drawn from ``seed``; returns every leaf."""
  k_w1, k_w2, k_data = jax.random.split(jax.random.key(seed), 3)
  params = {
    "w1": jax.random.normal(k_w1, (4, 16)) / 2,
    "b1": jnp.zeros((1, 16)),
    "w2": jax.random.normal(k_w2, (16, 1)) / 4,
  }
  tx = optax.chain(fsam_optax.fsam(rho=0.2, sigma=1.0, lmbda=0.6), optax.adamw(1e-2))
  opt_state = tx.init(params)
  step = sam_step(tx, loss_fn, outputs=("loss",))

  losses = []
  for i in range(6):
    x = jax.random.normal(jax.random.fold_in(k_data, i), (32, 4))
    y = jnp.sin(x.sum(axis=1, keepdims=True))
    if sharded:  # the batch split over the 8 CPU devices: cross-device reductions
      mesh = jax.make_mesh((8,), ("batch",), axis_types=(AxisType.Auto,))
      x, y = (jax.device_put(v, NamedSharding(mesh, PartitionSpec("batch"))) for v in (x, y))
    params, opt_state, loss = step(params, opt_state, x, y)
    losses.append(loss)
  return jax.tree.leaves((params, opt_state, losses))


@pytest.mark.parametrize("sharded", [False, True])
def test_same_seed_gives_bit_identical_runs(sharded):
  first, second = seeded_run(0, sharded), seeded_run(0, sharded)
  for x, y in zip(first, second, strict=True):
    np.testing.assert_array_equal(x, y)
  # The seed matters: another one gives another trajectory.
  assert not np.array_equal(first[-1], seeded_run(1, sharded)[-1])
