"""Plain trees from the (perturbed, clean) pairs, their norms, and pairs misused as arrays."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fsam_optax
from tests.jax_mlp import quadratic_loss
from tests.reference import fsam_steps

HYPER = {"rho": 0.2, "sigma": 1.0, "lmbda": 0.6}


def setup(tx=None):
  rng = np.random.default_rng(0)
  params = {"b": jnp.asarray(rng.normal(size=3)), "w": jnp.asarray(rng.normal(size=(3, 2)))}
  a = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape)), params)
  c = jax.tree.map(lambda x: jnp.asarray(0.5 + rng.random(size=x.shape)), params)
  tx = tx or optax.chain(fsam_optax.fsam(**HYPER), optax.sgd(0.1))
  grad_fn = fsam_optax.sam_value_and_grad(quadratic_loss, return_diagnostics=True)
  _, grads, diag = grad_fn(params, tx.init(params), a, c)
  return params, a, c, grads, diag


def test_plain_trees_and_their_norms_match_the_float64_reference():
  with jax.enable_x64(True):
    params, a, c, grads, diag = setup()
  leaves = lambda t: [np.asarray(x) for x in jax.tree.leaves(t)]
  (want,) = fsam_steps(leaves(params), [leaves(a)], leaves(c), **HYPER, lr=0.1)
  perturbed, clean = fsam_optax.perturbed_grads(grads), fsam_optax.clean_grads(grads)
  assert jax.tree.structure(perturbed) == jax.tree.structure(params)
  for got, ref in ((perturbed, want.perturbed), (clean, want.clean)):
    for x, y in zip(leaves(got), ref, strict=True):
      np.testing.assert_allclose(x, y, rtol=1e-13)
  norm = lambda xs: np.sqrt(sum(np.sum(x**2) for x in xs))
  np.testing.assert_allclose(float(diag.perturbed_grad_norm), norm(want.perturbed), rtol=1e-13)
  np.testing.assert_allclose(float(diag.clean_grad_norm), norm(want.clean), rtol=1e-13)


def test_optax_global_norm_of_the_pairs_mixes_both_gradients():
  """Why the helpers exist: optax.tree.norm cannot tell a pair from a subtree."""
  _, _, _, grads, diag = setup()
  mixed = float(optax.tree.norm(grads))
  both = np.hypot(float(diag.perturbed_grad_norm), float(diag.clean_grad_norm))
  np.testing.assert_allclose(mixed, both, rtol=1e-5)
  np.testing.assert_allclose(
    float(optax.tree.norm(fsam_optax.perturbed_grads(grads))),
    float(diag.perturbed_grad_norm),
    rtol=1e-6,
  )


def test_plain_sam_pairs_have_no_clean_gradient_but_the_diagnostics_have_its_norm():
  _, _, _, grads, diag = setup(optax.chain(fsam_optax.sam(0.2), optax.sgd(0.1)))
  with pytest.raises(ValueError, match=r"carry no clean gradient.*return_diagnostics=True"):
    fsam_optax.clean_grads(grads)
  assert float(diag.clean_grad_norm) > 0
  assert jax.tree.structure(fsam_optax.perturbed_grads(grads)) == jax.tree.structure(
    {"b": 0, "w": 0}
  )


def test_helpers_refuse_a_plain_tree():
  with pytest.raises(ValueError, match=r"perturbed_grads: expected the gradients of sam_value"):
    fsam_optax.perturbed_grads({"w": jnp.ones(2)})


@pytest.mark.parametrize(
  "use",
  [
    lambda params, grads: optax.apply_updates(params, grads),
    lambda params, grads: jax.tree.map(lambda p, g: p - 0.1 * g, params, grads),
    lambda params, grads: np.asarray(grads["w"]),
  ],
  ids=["apply_updates", "tree_map_arithmetic", "numpy"],
)
def test_a_pair_used_as_an_array_raises_with_what_to_do(use):
  params, _, _, grads, _ = setup()
  with pytest.raises(TypeError, match=r"SAMGrad \(perturbed, clean\) pair was used as an array"):
    use(params, grads)
