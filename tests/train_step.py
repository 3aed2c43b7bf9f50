"""The one training step the tests run: the helper's gradient pairs, ``tx.update``, apply."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
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
  jit: bool = True,
  **grad_kwargs: Any,
) -> Callable[..., tuple[Any, ...]]:
  """``(params, opt_state, *batch, **kw) -> (params, opt_state, *outputs)``, one step of ``tx``.

  ``grad_kwargs`` go to :func:`fsam_optax.sam_value_and_grad`, ``kw`` to the
  gradient function. ``outputs`` names extra results, in order: ``"loss"``,
  ``"grads"``, ``"updates"``, ``"diag"`` (with ``return_diagnostics=True``) and
  ``"finite"``. ``guard=True`` keeps the old params and state when a gradient is
  not finite (the README recipe); ``at(params)`` is what the helper
  differentiates at (lookahead's fast weights); ``jit=False`` returns the
  step unjitted, to wrap in ``shard_map`` or ``pmap``.
  """
  grad_fn = fsam_optax.sam_value_and_grad(loss_fn, **grad_kwargs)

  def step(params: Any, opt_state: Any, *batch: Any, **kw: Any) -> tuple[Any, ...]:
    loss, grads, *diag = grad_fn(at(params), opt_state, *batch, **kw)
    updates, new_state = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    finite = all_finite(grads)
    if guard:
      new_params, new_state = optax.tree.where(finite, (new_params, new_state), (params, opt_state))
    out = dict(loss=loss, grads=grads, updates=updates, diag=(diag or [None])[0], finite=finite)
    return (new_params, new_state, *(out[name] for name in outputs))

  return jax.jit(step) if jit else step


def sam_steps_taken(steps: int, **schedule: Any) -> list[bool]:
  """Which of ``steps`` steps ``fsam(**schedule)`` takes, as the library reports it.

  Observed, not recomputed: a skipped step's diagnostics show a zero perturbation.
  """
  return list(_taken(steps, tuple(sorted(schedule.items()))))


@functools.cache
def _taken(steps: int, schedule: tuple) -> tuple[bool, ...]:
  params = {"w": jnp.ones(2)}
  tx = fsam_optax.fsam(rho=0.1, sigma=0.0, **dict(schedule))  # d = g, never 0
  step = sam_step(tx, lambda p: jnp.sum(p["w"] ** 2), outputs=("diag",), return_diagnostics=True)
  state, taken = tx.init(params), []
  for _ in range(steps):
    _, state, diag = step(params, state)
    taken.append(bool(diag.perturbation_norm > 0))
  return tuple(taken)
