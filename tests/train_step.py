"""The one training step the tests run: the helper's gradient pairs, ``tx.update``, apply."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fsam_optax


def all_finite(tree: Any) -> jax.Array:
  return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def sam_step(
  tx: optax.GradientTransformation,
  loss_fn: Callable[..., Any],
  *,
  outputs: Sequence[str] = (),
  guard: bool = False,
  at: Callable[[Any], Any] = lambda p: p,
  mapped: Callable[[Callable], Callable] | None = None,
  jit: bool = True,
  **grad_kwargs: Any,
) -> Callable[..., tuple[Any, ...]]:
  """``(params, opt_state, *batch, **kw) -> (params, opt_state, *outputs)``, one step of ``tx``.

  ``grad_kwargs`` go to :func:`fsam_optax.sam_value_and_grad`, ``kw`` to the
  gradient function. ``outputs`` names extra results, in order: ``"loss"``,
  ``"grads"``, ``"updates"``, ``"diag"``, ``"norms"`` (the direction's and the
  perturbation's, shaped ``(2,)`` so that ``shard_map`` can return them once per
  data replica; both ask for diagnostics) and ``"finite"``. ``guard=True`` keeps
  the old params and state when a gradient is not finite (the README recipe);
  ``at(params)`` is what the helper differentiates at (lookahead's fast
  weights). ``mapped`` wraps the step before ``jit``: ``functools.partial`` of
  ``jax.shard_map`` with its mesh and specs, or of ``jax.pmap`` (with
  ``jit=False``, which returns the step unjitted).
  """
  if {"diag", "norms"} & set(outputs):
    grad_kwargs.setdefault("return_diagnostics", True)
  grad_fn = fsam_optax.sam_value_and_grad(loss_fn, **grad_kwargs)

  def step(params: Any, opt_state: Any, *batch: Any, **kw: Any) -> tuple[Any, ...]:
    loss, grads, *diag = grad_fn(at(params), opt_state, *batch, **kw)
    updates, new_state = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    finite = all_finite(grads)
    if guard:
      new_params, new_state = optax.tree.where(finite, (new_params, new_state), (params, opt_state))
    out = dict(loss=loss, grads=grads, updates=updates, finite=finite)
    for d in diag:  # with return_diagnostics=True
      out |= dict(diag=d, norms=jnp.stack([d.direction_norm, d.perturbation_norm]))
    return (new_params, new_state, *(out[name] for name in outputs))

  step = step if mapped is None else mapped(step)
  return jax.jit(step) if jit else step


def documented_draw(p: float, seed: int, steps: int) -> list[bool]:
  """The documented draw: ``uniform(fold_in(key(seed), t)) < p`` at step count ``t``."""
  key = lambda t: jax.random.fold_in(jax.random.key(seed), t)
  return [bool(jax.random.uniform(key(t), dtype=jnp.float32) < p) for t in range(steps)]


def sam_steps_taken(steps: int, **schedule: Any) -> list[bool]:
  """Which of ``steps`` steps ``fsam(**schedule)`` takes, as the library reports it.

  Observed, not recomputed: a skipped step's diagnostics show a zero perturbation.
  """
  return list(_taken(steps, tuple(sorted(schedule.items()))))


def _probe(**schedule: Any) -> tuple[optax.GradientTransformation, Any]:
  """An F-SAM whose direction is never 0 (``sigma=0``: ``d = g``), and its params."""
  return fsam_optax.fsam(rho=0.1, sigma=0.0, **schedule), {"w": jnp.ones(2)}


def _loss(params: Any) -> jax.Array:
  return jnp.sum(params["w"] ** 2)


@functools.cache
def _taken(steps: int, schedule: tuple) -> tuple[bool, ...]:
  tx, params = _probe(**dict(schedule))
  step = sam_step(tx, _loss, outputs=("diag",))
  state, taken = tx.init(params), []
  for _ in range(steps):
    _, state, diag = step(params, state)
    taken.append(bool(diag.perturbation_norm > 0))
  return tuple(taken)


def sam_steps_at(counts: jax.Array, **schedule: Any) -> np.ndarray:
  """Whether ``fsam(**schedule)`` takes the SAM step at each step count in ``counts``.

  As :func:`sam_steps_taken` observes it, with the state's count set to each in turn.
  """
  tx, params = _probe(**schedule)
  grad_fn = fsam_optax.sam_value_and_grad(_loss, return_diagnostics=True)
  norm = lambda c: grad_fn(params, tx.init(params)._replace(count=c))[2].perturbation_norm
  return np.asarray(jax.jit(jax.vmap(norm))(counts) > 0)


def per_worker_step(
  tx: optax.GradientTransformation, loss_fn: Callable[..., Any], axis_name: str
) -> Callable[..., tuple[Any, ...]]:
  """:func:`sam_step` under ``jax.pmap``, each worker's rules on its own gradients.

  As a ``pmap`` trainer runs a SAM-family method per worker and averages after it
  (``perturbation="per_device"``).
  """
  mapped = functools.partial(jax.pmap, axis_name=axis_name)
  return sam_step(
    tx, loss_fn, mapped=mapped, jit=False, axis_name=axis_name, perturbation="per_device"
  )


def replicate(tree: Any, n: int) -> Any:
  """``tree`` stacked ``n`` times along a new leading axis, one copy per ``pmap`` device."""
  return jax.tree.map(lambda a: jnp.broadcast_to(a, (n, *a.shape)), tree)
