"""What the SAM-family transformations beside F-SAM share: argument checks and the update.

Each method's update hands the base optimizer the pairs' ``perturbed`` gradients
and advances its state: the count, ``rho`` at the new count, its scalars, and the
buffer that the pairs' ``carry`` replaces (VaSSO's average, LookSAM's ``g_v``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import optax

from fsam_optax._fsam import advance_if_finite
from fsam_optax._hyperparams import at, check, default_float
from fsam_optax._mask import Mask, check_mask_leaves
from fsam_optax._pairs import split_grads

Update = Callable[..., tuple[optax.Updates, Any]]


def check_arguments(method: str, rho: Any, eps: Any, mask: Mask | None) -> None:
  """The checks of the arguments every method takes, with ``method`` named in the errors."""
  check(method, "rho", rho, lambda v: v >= 0, "a radius >= 0")
  check(method, "eps", eps, lambda v: v > 0, "> 0")
  if mask is not None and not callable(mask):
    check_mask_leaves(jax.tree.leaves(mask), method)


def advancing_update(
  method: str,
  rho: optax.ScalarOrSchedule,
  scalars: Mapping[str, Any],
  skip_nonfinite: bool,
  carried: str | None = None,
) -> Update:
  """The ``update_fn`` of ``method``: ``perturbed`` to the base optimizer, the state advanced.

  ``scalars`` are stored again at each update (under ``inject_hyperparams``,
  the values set last); ``carried`` names the state's buffer that the pairs'
  ``carry`` replaces.
  """

  def update_fn(
    updates: optax.Updates, state: Any, params: optax.Params | None = None, **extra_args: Any
  ) -> tuple[optax.Updates, Any]:
    del params, extra_args
    base, _, carry, treedef = split_grads(updates, method)
    fields = {}
    if carried is not None:
      old, buffer_def = jax.tree.flatten(getattr(state, carried))
      if any(c is None for c in carry) or len(carry) != len(old):
        raise ValueError(
          f"{method}: these gradients carry no `{carried}` for the state; compute them "
          "with sam_value_and_grad from the same opt_state you pass to tx.update."
        )
      fields[carried] = jax.tree.unflatten(buffer_def, carry)

    def advance() -> Any:
      count = optax.safe_increment(state.count)
      stored = {name: default_float(value) for name, value in scalars.items()}
      return state._replace(count=count, rho=at(rho, count), **stored, **fields)

    kept = [*base, *(c for c in carry if c is not None)]
    new_state = advance_if_finite(skip_nonfinite, advance, state, kept)
    return jax.tree.unflatten(treedef, base), new_state

  return update_fn
