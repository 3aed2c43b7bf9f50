"""Property-based tests: any pytree, any float dtype, F-SAM equals the float64 reference.

Hypothesis draws the structure (nested dicts, lists, tuples, NamedTuples, empty
containers), the leaf shapes (scalars and zero-size arrays included), the leaf
dtypes, the hyperparameters and the options (the moving average's dtype, which
steps take the SAM step, the non-finite guard); the values come from a NumPy
generator seeded by hypothesis. Steps run eagerly, so no example pays for a compilation.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fsam_optax
from tests.jax_mlp import quadratic_loss
from tests.reference import fsam_steps
from tests.train_step import sam_step, sam_steps_taken

LR = 0.1
# Relative tolerance per dtype, a few roundings of its epsilon; the values
# compared are of order one, so it also serves as the absolute tolerance.
TOL = {
  jnp.dtype(jnp.bfloat16): 3e-2,
  jnp.dtype(jnp.float16): 4e-3,
  jnp.dtype(jnp.float32): 2e-5,
  jnp.dtype(jnp.float64): 1e-12,
}


SHAPES = [(), (0,), (3,), (2, 3), (1, 0, 2)]  # scalars and zero-size arrays included


class Pair(NamedTuple):
  first: Any
  second: Any


@dataclasses.dataclass(frozen=True)
class LeafSpec:
  """Shape and dtype of one parameter (a pytree leaf, not a container)."""

  shape: tuple[int, ...]
  dtype: str


def _specs(dtypes: list[str]) -> st.SearchStrategy:
  leaf = st.builds(
    LeafSpec,
    # A few shapes, reused across examples, so eager ops hit JAX's caches.
    shape=st.sampled_from(SHAPES),
    dtype=st.sampled_from(dtypes),
  )
  containers = lambda kids: st.one_of(
    st.lists(kids, max_size=3),
    st.lists(kids, max_size=3).map(tuple),
    st.dictionaries(st.sampled_from("abcd"), kids, max_size=3),
    st.builds(Pair, kids, kids),
  )
  return st.recursive(leaf, containers, max_leaves=5)


# Which steps take the SAM step: all, every other one from the first, or a seeded draw.
SCHEDULES = [{}, {"every": 2}, {"probability": 0.5, "seed": 3}]


def _taken(schedule: dict[str, Any], steps: int) -> list[bool] | None:
  """The steps ``schedule`` takes (``None``: every step); draws as the library reports them."""
  if "every" in schedule:
    return [t % schedule["every"] == 0 for t in range(steps)]
  if "probability" in schedule:
    return sam_steps_taken(steps, **schedule)
  return None


@st.composite
def problems(
  draw: st.DrawFn,
  dtypes: list[str],
  ema_dtypes: tuple[str | None, ...] = (None,),
  schedules: list[dict[str, Any]] = SCHEDULES,
) -> dict[str, Any]:
  """A pytree of specs, F-SAM hyperparameters and options, and a seed for the values."""
  return {
    "specs": draw(_specs(dtypes)),
    "rho": draw(st.sampled_from([0.05, 0.2, 0.5])),
    # A Python 0.0 is SAM with no moving average; other values keep one.
    "sigma": draw(st.sampled_from([0.0, 0.5, 1.0, 1.7])),
    "lmbda": draw(st.sampled_from([0.0, 0.6, 0.95])),
    # An array (float32, or float64 with x64) is strongly typed where a Python
    # float is weak: it must not promote a lower-precision moving average.
    "lmbda_as_array": draw(st.booleans()),
    "adaptive": draw(st.booleans()),
    "zero_grads": draw(st.booleans()),
    "seed": draw(st.integers(0, 2**31 - 1)),
    # A moving average narrower than the params must stay so (it is cast back).
    "ema_dtype": draw(st.sampled_from(ema_dtypes)),
    "schedule": draw(st.sampled_from(schedules)),
    # On finite steps the guard must change nothing.
    "skip_nonfinite": draw(st.booleans()),
  }


def _values(
  specs: Any, seed: int, zero_grads: bool, independent_batches: int = 0
) -> tuple[Any, ...]:
  """Params, the two batches' ``a`` and ``c``, as arrays of each leaf's dtype.

  ``|a| >= 0.5`` dominates ``c * p`` (at most 0.1), and the second batch flips
  the sign of ``a``, so ``d = g - sigma * m`` never nearly cancels: the
  comparison measures the optimizer, not an ill-conditioned direction.
  """
  rng = np.random.default_rng(seed)

  def draw(spec: LeafSpec, kind: str) -> jax.Array:
    if kind == "p":
      x = rng.uniform(-1, 1, spec.shape)
    elif kind == "a":
      x = rng.uniform(0.5, 1.5, spec.shape) * rng.choice([-1.0, 1.0], spec.shape)
    else:
      x = rng.uniform(0.05, 0.1, spec.shape)
    if zero_grads and kind != "p":
      x = np.zeros(spec.shape)
    return jnp.asarray(x, spec.dtype)

  p = jax.tree.map(lambda s: draw(s, "p"), specs)
  a = jax.tree.map(lambda s: draw(s, "a"), specs)
  c = jax.tree.map(lambda s: draw(s, "c"), specs)
  if independent_batches:
    # Unrelated batches: the direction then depends on sigma and on the whole history.
    more = [jax.tree.map(lambda s: draw(s, "a"), specs) for _ in range(independent_batches - 1)]
    return p, [a, *more], c
  return p, [a, jax.tree.map(jnp.negative, a)], c


def _strong(value: float) -> jax.Array:
  """``value`` as a strongly typed array of the default float (float64 with x64)."""
  return jnp.asarray(value, jnp.result_type(float))


def _check_against_reference(problem: dict[str, Any], independent_batches: int = 0) -> None:
  """F-SAM + SGD steps (two, or one per independent batch): finite, state kept, as the reference."""
  params, batches, c = _values(
    problem["specs"], problem["seed"], problem["zero_grads"], independent_batches
  )
  tx = optax.chain(
    fsam_optax.fsam(
      rho=problem["rho"],
      sigma=problem["sigma"],
      lmbda=_strong(problem["lmbda"]) if problem["lmbda_as_array"] else problem["lmbda"],
      adaptive=problem["adaptive"],
      ema_dtype=problem["ema_dtype"],
      skip_nonfinite=problem["skip_nonfinite"],
      **problem["schedule"],
    ),
    optax.sgd(LR),
  )
  step = sam_step(tx, quadratic_loss, outputs=("diag",), jit=False)
  state = init_state = tx.init(params)
  p = params
  got = []
  for a in batches:
    p, state, diag = step(p, state, a, c)
    got.append((p, state, diag))

  ref = fsam_steps(
    [np.asarray(x, np.float64) for x in jax.tree.leaves(params)],
    [[np.asarray(x, np.float64) for x in jax.tree.leaves(a)] for a in batches],
    [np.asarray(x, np.float64) for x in jax.tree.leaves(c)],
    rho=problem["rho"],
    sigma=problem["sigma"],
    lmbda=problem["lmbda"],
    lr=LR,
    adaptive=problem["adaptive"],
    take=_taken(problem["schedule"], len(batches)),
  )
  dtypes = {x.dtype for x in jax.tree.leaves(params)}
  if problem["ema_dtype"] is not None and problem["sigma"] != 0.0:
    dtypes.add(jnp.dtype(problem["ema_dtype"]))
  tol = max((TOL[d] for d in dtypes), default=0.0)
  dtype_of = lambda tree: jax.tree.map(lambda x: x.dtype, tree)
  for (p_t, state_t, diag), step in zip(got, ref, strict=True):
    # The optimizer itself makes no NaN or Inf, zero gradients included.
    for leaf in jax.tree.leaves((p_t, state_t, diag)):
      assert np.all(np.isfinite(np.asarray(leaf, np.float64)))
    # Params and state keep their structure and every leaf's dtype.
    assert jax.tree.structure(p_t) == jax.tree.structure(params)
    assert dtype_of(p_t) == dtype_of(params)
    assert jax.tree.structure(state_t) == jax.tree.structure(init_state)
    assert dtype_of(state_t) == dtype_of(init_state)
    np.testing.assert_allclose(float(diag.direction_norm), step.direction_norm, rtol=tol, atol=tol)
    for x, r in zip(jax.tree.leaves(p_t), step.params, strict=True):
      np.testing.assert_allclose(np.asarray(x, np.float64), r, rtol=tol, atol=tol)
    fsam_state = state_t[0]
    if problem["sigma"] == 0.0:
      assert fsam_state.ema is None
    else:
      if problem["ema_dtype"] is not None:
        assert {x.dtype for x in jax.tree.leaves(fsam_state.ema)} <= {
          jnp.dtype(problem["ema_dtype"])
        }
      for x, r in zip(jax.tree.leaves(fsam_state.ema), step.ema, strict=True):
        np.testing.assert_allclose(np.asarray(x, np.float64), r, rtol=tol, atol=tol)
  assert int(got[-1][1][0].count) == len(batches)


@settings(max_examples=20, deadline=None, derandomize=True, database=None)
@given(problems(["float32", "bfloat16", "float16"], ema_dtypes=(None, "bfloat16")))
def test_two_steps_match_float64_reference_for_any_pytree_and_dtype(problem):
  _check_against_reference(problem)


@settings(max_examples=10, deadline=None, derandomize=True, database=None)
@given(problems(["float64", "float32", "bfloat16"], ema_dtypes=(None, "bfloat16")))
def test_two_steps_match_float64_reference_with_x64(problem):
  # float64 leaves exist only with x64 on; mixed with lower precisions, the
  # norm is accumulated in float64 and each leaf keeps its own dtype.
  with jax.enable_x64(True):
    _check_against_reference(problem)


@settings(max_examples=10, deadline=None, derandomize=True, database=None)
@given(problems(["float64"]))
def test_three_unrelated_batches_match_float64_reference_closely(problem):
  # In float64 alone the tolerance is tight enough to see sigma and the moving
  # average's history in every step, which the sign-flipped batches above hide.
  with jax.enable_x64(True):
    _check_against_reference(problem, independent_batches=3)


@settings(max_examples=10, deadline=None, derandomize=True, database=None)
@given(problems(["float64"], schedules=SCHEDULES[1:]))
def test_scheduled_steps_match_float64_reference_closely(problem):
  # Every example takes some steps and skips others, so the tight float64
  # tolerance sees which ones (the examples above rarely draw a schedule with
  # nonzero gradients).
  with jax.enable_x64(True):
    _check_against_reference(problem, independent_batches=3)


@settings(max_examples=8, deadline=None, derandomize=True, database=None)
@given(problems(["float32", "bfloat16", "float16"]))
def test_state_hyperparameters_keep_default_float_dtype(problem):
  """rho, sigma and eps are float32 without x64 and float64 with it."""
  params, _, _ = _values(problem["specs"], problem["seed"], False)
  tx = fsam_optax.fsam(rho=problem["rho"], sigma=problem["sigma"], lmbda=problem["lmbda"])
  state = tx.init(params)
  assert {state.rho.dtype, state.sigma.dtype, state.eps.dtype} == {jnp.dtype(jnp.float32)}
  assert state.count.dtype == jnp.int32
  if state.ema is not None:
    # float32 for narrower params, the params' dtype otherwise.
    widened = lambda x: jnp.promote_types(x.dtype, jnp.float32)
    assert jax.tree.map(lambda x: x.dtype, state.ema) == jax.tree.map(widened, params)
  with jax.enable_x64(True):
    state = tx.init(params)
    assert {state.rho.dtype, state.sigma.dtype, state.eps.dtype} == {jnp.dtype(jnp.float64)}


def test_float16_adaptive_products_do_not_overflow():
  """|theta| * d = 300 * 600 exceeds float16's range; the perturbation stays finite."""
  params = {"w": jnp.array([300.0, 1.0], jnp.float16)}
  a = {"w": jnp.array([300.0, 1.0], jnp.float16)}
  c = {"w": jnp.ones(2, jnp.float16)}
  tx = optax.chain(fsam_optax.fsam(rho=0.1, adaptive=True), optax.sgd(LR))
  grad_fn = fsam_optax.sam_value_and_grad(quadratic_loss)
  _, grads = grad_fn(params, tx.init(params), a, c)
  updates, _ = tx.update(grads, tx.init(params), params)
  (ref,) = fsam_steps(
      [np.array([300.0, 1.0])], [[np.array([300.0, 1.0])]], [np.ones(2)],
      rho=0.1, sigma=1.0, lmbda=0.9, lr=LR, adaptive=True,
  )  # fmt: skip
  got = np.asarray(optax.apply_updates(params, updates)["w"], np.float64)
  assert updates["w"].dtype == jnp.float16
  np.testing.assert_allclose(got, ref.params[0], rtol=4e-3)


def test_empty_params_step_to_empty_updates():
  for params in ({}, [], {"a": [], "b": {}}):
    tx = optax.chain(fsam_optax.fsam(rho=0.2), optax.sgd(LR))
    state = tx.init(params)
    _, grads = fsam_optax.sam_value_and_grad(quadratic_loss)(params, state, params, params)
    updates, state = tx.update(grads, state, params)
    assert updates == params
    assert int(state[0].count) == 1


def test_update_with_the_state_of_other_params_is_refused():
  """Gradients for two leaves fed to a state that averages one say how to fix it."""
  tx = fsam_optax.fsam()
  two = {"a": jnp.ones(2), "b": jnp.ones(2)}
  _, grads = fsam_optax.sam_value_and_grad(quadratic_loss)(two, tx.init(two), two, two)
  with pytest.raises(ValueError, match="the gradients have 2 leaves but the state's `ema` has 1"):
    tx.update(grads, tx.init({"a": jnp.ones(2)}))


def test_python_number_leaves_step_like_scalar_arrays():
  """A Python float leaf (eager, outside jit) is handled as a 0-d float32 array."""

  def two_steps(params):
    loss = lambda p: p["t"] ** 2 + jnp.sum(p["w"] ** 2)
    tx = optax.chain(fsam_optax.fsam(rho=0.2), optax.sgd(LR))
    step, state = sam_step(tx, loss, jit=False), tx.init(params)
    for _ in range(2):
      params, state = step(params, state)
    return params, state

  w = jnp.array([1.0, -2.0])
  got = two_steps({"t": 2.0, "w": w})
  expected = two_steps({"t": jnp.float32(2.0), "w": w})
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
    np.testing.assert_array_equal(x, y)
