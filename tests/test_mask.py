"""`mask`: excluded leaves are not perturbed and are left out of the norm.

The params mimic a conv net with BatchNorm: kernels, biases, BN scales/biases.
The loss is separable, so an unperturbed leaf's perturbed gradient must equal
its clean gradient exactly.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fsam_optax
from tests.jax_mlp import quadratic_loss
from tests.reference import fsam_steps
from tests.train_step import sam_step

LR = 0.1
HYPER = {"rho": 0.2, "sigma": 1.0, "lmbda": 0.6}


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


def _run(mask: Any, steps: int = 2, adaptive: bool = False) -> list[tuple]:
  params, a1, c = _params(0), _params(1), jax.tree.map(lambda x: 0.1 * jnp.abs(x), _params(2))
  tx = optax.chain(fsam_optax.fsam(**HYPER, adaptive=adaptive, mask=mask), optax.sgd(LR))
  state = tx.init(params)
  step = sam_step(tx, quadratic_loss, outputs=("grads", "diag"), return_diagnostics=True)
  out = []
  for a in [a1, jax.tree.map(jnp.negative, a1)][:steps]:
    params, state, grads, diag = step(params, state, a, c)
    out.append((params, state[0], grads, diag))
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
  (_, _, grads, diag), _ = _run(_kernels_only)
  for path, pair in jax.tree_util.tree_leaves_with_path(
    grads, is_leaf=lambda x: isinstance(x, fsam_optax.SAMGrad)
  ):
    if path[-1].key == "kernel":
      assert not np.array_equal(pair.perturbed, pair.clean)
    else:
      np.testing.assert_array_equal(pair.perturbed, pair.clean)
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
  (_, _, grads, diag), _ = _run(False)
  # Nothing perturbed: a zero norm, no NaN, and g' = g everywhere.
  assert float(diag.direction_norm) == 0.0 and float(diag.perturbation_norm) == 0.0
  for pair in jax.tree.leaves(grads, is_leaf=lambda x: isinstance(x, fsam_optax.SAMGrad)):
    np.testing.assert_array_equal(pair.perturbed, pair.clean)


def test_mask_works_under_inject_hyperparams():
  params = _params(0)
  tx = optax.chain(
    optax.inject_hyperparams(fsam_optax.fsam)(**HYPER, mask=PREFIX_MASK), optax.sgd(LR)
  )
  a, c = _params(1), jax.tree.map(jnp.ones_like, params)
  _, grads = fsam_optax.sam_value_and_grad(quadratic_loss)(params, tx.init(params), a, c)
  np.testing.assert_array_equal(grads["bn"]["scale"].perturbed, grads["bn"]["scale"].clean)
  assert not np.array_equal(grads["conv"]["kernel"].perturbed, grads["conv"]["kernel"].clean)


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
