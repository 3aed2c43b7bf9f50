"""A SAM-family method plugs in as a state with a direction and pairs, with no change to the helper.

The method here perturbs along a fixed direction ``v`` that its state holds:
``g' = grad(theta + rho v / ||v||)``, which ``jax.grad`` computes directly.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import fsam_optax
from fsam_optax._method import Step, sam_state
from fsam_optax._perturbation import Direction


@sam_state
class FixedDirectionState(NamedTuple):
  count: jax.Array
  rho: jax.Array
  eps: jax.Array
  v: Any
  config: fsam_optax.PerturbationConfig

  def direction(self, grads: list[jax.Array], step: Step) -> Direction:
    del grads, step
    return Direction(jax.tree.leaves(self.v), jax.tree.leaves(self.v))

  def pairs(self, perturbed: Any, clean: Any, step: Step) -> Any:
    del clean, step
    return jax.tree.map(lambda g: fsam_optax.SAMGrad(g, None), perturbed)


def loss(params: dict, x: jax.Array) -> jax.Array:
  return jnp.sum(jnp.sin(params["w"] * x)) + jnp.sum(params["b"] ** 3)


PARAMS = {"w": jnp.arange(1.0, 9.0), "b": jnp.array([0.5, -1.0])}
V = {"w": jnp.linspace(-1.0, 1.0, 8), "b": jnp.array([2.0, 1.0])}
X = jnp.linspace(0.1, 0.8, 8)


def expected() -> dict:
  norm = jnp.sqrt(sum(jnp.sum(v**2) for v in jax.tree.leaves(V)))
  return jax.grad(loss)(jax.tree.map(lambda p, v: p + 0.3 * v / norm, PARAMS, V), X)


def state() -> FixedDirectionState:
  return FixedDirectionState(
    jnp.int32(0), jnp.float32(0.3), jnp.float32(0.0), V, fsam_optax.PerturbationConfig()
  )


def test_a_registered_state_is_driven_by_the_helper():
  _, grads = jax.jit(fsam_optax.sam_value_and_grad(loss))(PARAMS, state(), X)
  got = fsam_optax.perturbed_grads(grads)
  for k, want in expected().items():
    np.testing.assert_allclose(got[k], want, rtol=1e-6)


def test_a_registered_state_gets_the_whole_tree_norm_of_split_params():
  mesh = jax.make_mesh((2,), ("model",))
  specs = {"w": P("model"), "b": P()}
  # Each device holds half of w and of x: the loss adds the halves' terms.
  split_loss = lambda p, x: (
    jax.lax.psum(jnp.sum(jnp.sin(p["w"] * x)), "model") + jnp.sum(p["b"] ** 3)
  )
  grad_fn = fsam_optax.sam_value_and_grad(split_loss, param_specs=specs)
  state_specs = FixedDirectionState(P(), P(), P(), specs, fsam_optax.PerturbationConfig())
  step = jax.shard_map(
    lambda p, s, x: fsam_optax.perturbed_grads(grad_fn(p, s, x)[1]),
    mesh=mesh,
    in_specs=(specs, state_specs, P("model")),
    out_specs=specs,
  )
  put = lambda tree, spec: jax.device_put(
    tree, jax.tree.map(lambda s: jax.NamedSharding(mesh, s), spec)
  )
  got = jax.jit(step)(put(PARAMS, specs), put(state(), state_specs), put(X, P("model")))
  for k, want in expected().items():
    np.testing.assert_allclose(got[k], want, rtol=1e-6)


def test_a_state_without_the_interface_is_refused_at_registration():
  class Incomplete(NamedTuple):
    count: jax.Array

  with pytest.raises(TypeError, match=r"Incomplete lacks \['rho', 'eps', 'config'"):
    sam_state(Incomplete)
