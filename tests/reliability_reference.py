"""The float64 NumPy F-SAM of ``tests.reference`` driven on a pytree, with a mask.

The loss it pairs with is separable and quadratic, ``sum(a * p + c * p**2 / 2)``
per leaf, so its gradient ``a + c * p`` is known in closed form and every leaf's
gradient depends on that leaf alone: an unperturbed leaf's perturbed gradient
equals its clean one exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tests.reference import FSAMReference


def quadratic_loss(params: Any, a: Any, c: Any) -> jax.Array:
  """``sum(a * p + c * p**2 / 2)`` over all leaves; ``a`` and ``c`` mirror ``params``."""
  terms = [
    jnp.sum(ai * p + 0.5 * ci * p * p)
    for p, ai, ci in zip(
      jax.tree.leaves(params), jax.tree.leaves(a), jax.tree.leaves(c), strict=True
    )
  ]
  # The float32 start makes an empty tree a differentiable float scalar.
  return sum(terms, jnp.zeros([], jnp.float32))


class Step(NamedTuple):
  """What one reference step produced (lists follow the params' leaf order)."""

  params: list[np.ndarray]
  ema: list[np.ndarray]
  clean: list[np.ndarray]
  perturbed: list[np.ndarray]
  direction_norm: float


def fsam_steps(
  params: Sequence[np.ndarray],
  a_per_step: Sequence[Sequence[np.ndarray]],
  c: Sequence[np.ndarray],
  *,
  rho: float,
  sigma: float,
  lmbda: float,
  lr: float,
  adaptive: bool = False,
  mask: Sequence[bool] | None = None,
  per_step: Sequence[dict[str, float]] | None = None,
  clip_clean: float | None = None,
  base: Callable[[dict, dict], dict] | None = None,
  take: Sequence[bool] | None = None,
) -> list[Step]:
  """Runs F-SAM then plain SGD(``lr``) on :func:`quadratic_loss`, in float64.

  The algorithm is ``tests.reference.FSAMReference`` on the leaves keyed by
  position; a mask restricts the perturbation, and so its norm, to the chosen
  leaves, while the moving average still covers every leaf. ``per_step[i]``
  overrides hyperparameters (``rho``, ``sigma``, ``lmbda``) at step ``i``;
  ``clip_clean`` clips the clean gradient to that global norm before it forms
  the direction and feeds the average;
  ``base(theta, g_pert)`` replaces the SGD step (``lr`` is then unused).
  ``take[i] = False`` skips the SAM step at step ``i`` (a schedule's choice): no
  perturbation (``g' = g``, direction norm 0), while the average is still fed ``g``.
  """
  as64 = lambda xs: dict(enumerate(np.asarray(x, np.float64) for x in xs))
  theta, c = as64(params), as64(c)
  kept = [k for k in theta if mask is None or mask[k]]
  opt = FSAMReference(rho=rho, sigma=sigma, lmbda=lmbda, adaptive=adaptive)
  steps = []
  for i, a in enumerate(map(as64, a_per_step)):
    for name, value in (per_step[i] if per_step is not None else {}).items():
      setattr(opt, name, value)
    g = {k: a[k] + c[k] * theta[k] for k in theta}
    if clip_clean is not None:
      g_norm = np.sqrt(sum(np.sum(v**2) for v in g.values()))
      g = {k: v * min(1.0, clip_clean / g_norm) for k, v in g.items()}
    d = opt.direction(g)  # advances the moving average on every step
    e = {k: np.zeros_like(v) for k, v in theta.items()}
    n = 0.0
    if take is None or take[i]:
      e.update(opt.perturbation({k: theta[k] for k in kept}, {k: d[k] for k in kept}))
      n = np.sqrt(sum(np.sum((np.abs(theta[k]) * d[k] if adaptive else d[k]) ** 2) for k in kept))
    g_pert = {k: a[k] + c[k] * (theta[k] + e[k]) for k in theta}
    if base is None:
      theta = {k: theta[k] - lr * g_pert[k] for k in theta}
    else:
      theta = base(theta, g_pert)
    steps.append(
      Step(*map(list, (theta.values(), opt.m.values(), g.values(), g_pert.values())), float(n))
    )
  return steps


def drawn(p: float, seed: int, steps: int) -> list[bool]:
  """Steps that ``fsam(probability=p, seed=seed)`` takes: ``uniform(fold_in(key(seed), t)) < p``."""
  return [
    bool(jax.random.uniform(jax.random.fold_in(jax.random.key(seed), t), dtype=jnp.float32) < p)
    for t in range(steps)
  ]
