"""The JAX twins of ``tests/reference.py``'s losses, and F-SAM's g' by hand from them.

The reference side uses only NumPy (``reference.mlp_loss_and_grad``), so a
test that compares the library with it compares two independent computations.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

import fsam_optax
from tests import reference as ref
from tests.train_step import sam_step

# Each method of the family, and its NumPy reference driven through ``gradient(theta,
# grad_at)``, for tests that train a model of their own with both.
METHOD_PAIRS = {
  "fsam": (
    lambda: fsam_optax.fsam(rho=0.2, sigma=1.0, lmbda=0.6),
    lambda: ref.FSAMReference(rho=0.2, sigma=1.0, lmbda=0.6),
  ),
  "sam": (lambda: fsam_optax.sam(rho=0.1), lambda: ref.FSAMReference(0.1, 0.0, 0.0)),
  "gsam": (lambda: fsam_optax.gsam(rho=0.2, alpha=0.4), lambda: ref.GSAMReference(0.2, 0.4)),
  "vasso": (lambda: fsam_optax.vasso(rho=0.2, theta=0.4), lambda: ref.VaSSOReference(0.2, 0.4)),
  "looksam": (
    lambda: fsam_optax.looksam(rho=0.2, every=5, alpha=0.7),
    lambda: ref.LookSAMReference(rho=0.2, k=5, alpha=0.7),
  ),
}


def mlp_loss(params: dict, x: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
  """Mean squared error of the tanh MLP of ``reference.init_mlp``."""
  n_layers = len(params) // 2
  h = x
  for i in range(n_layers):
    h = h @ params[f"w{i}"] + params[f"b{i}"][None, :]
    if i < n_layers - 1:
      h = jnp.tanh(h)
  return jnp.mean((h - y) ** 2)


def megatron_loss(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
  """``mlp_loss`` of a one-hidden-layer MLP whose hidden units are split over ``"model"``
  (``w0``, ``b0`` by columns, ``w1`` by rows), inside ``shard_map``."""
  h = jnp.tanh(x @ params["w0"] + params["b0"][None, :])
  out = jax.lax.psum(h @ params["w1"], "model") + params["b1"][None, :]
  return jnp.mean((out - y) ** 2)


def fsdp_loss(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
  """``mlp_loss`` with params sharded under ``jit`` on an Explicit mesh: gathered first,
  the all-gather of FSDP, which such a mesh wants spelt out."""
  return mlp_loss(jax.tree.map(lambda w: jax.sharding.reshard(w, P()), params), x, y)


def run_library(tx: optax.GradientTransformation, data: list, seed: int = 0, **grad_kwargs):
  """Trains ``reference.init_mlp(seed)`` with ``tx`` on ``data``, one jitted step a batch.

  Returns the params after every step and the final optimizer state.
  """
  params = jax.tree.map(jnp.asarray, ref.init_mlp(seed))
  opt_state = tx.init(params)
  step = sam_step(tx, mlp_loss, **grad_kwargs)
  path = []
  for x, y in data:
    params, opt_state = step(params, opt_state, x, y)
    path.append(params)
  return path, opt_state


def perturbed_grad(opt: ref.FSAMReference, theta: dict, x: np.ndarray, y: np.ndarray) -> dict:
  """Steps 1-5 of F-SAM in NumPy: g' on one batch (and ``opt``'s EMA advanced)."""
  _, g = ref.mlp_loss_and_grad(theta, x, y)
  e = opt.perturbation(theta, opt.direction(g))
  return ref.mlp_loss_and_grad({k: theta[k] + e[k] for k in theta}, x, y)[1]


def max_abs_diff(a: dict, b: dict) -> float:
  return max(float(np.max(np.abs(np.asarray(a[k]) - np.asarray(b[k])))) for k in b)


def max_rel_error(path: list[dict], ref_path: list[dict]) -> float:
  """Worst ``||got - want|| / ||want||`` over the leaves and steps of two paths of params."""
  return max(
    float(np.linalg.norm(np.asarray(got[k]) - w) / np.linalg.norm(w))
    for got, want in zip(path, ref_path, strict=True)
    for k, w in want.items()
  )


def quadratic_loss(params: Any, a: Any, c: Any) -> jax.Array:
  """``sum(a * p + c * p**2 / 2)`` over all leaves; ``a`` and ``c`` mirror ``params``.

  Its gradient ``a + c * p`` is known in closed form (``reference.fsam_steps``) and
  each leaf's depends on that leaf alone.
  """
  terms = [
    jnp.sum(ai * p + 0.5 * ci * p * p)
    for p, ai, ci in zip(
      jax.tree.leaves(params), jax.tree.leaves(a), jax.tree.leaves(c), strict=True
    )
  ]
  # The float32 start makes an empty tree a differentiable float scalar.
  return sum(terms, jnp.zeros([], jnp.float32))
