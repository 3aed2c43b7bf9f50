"""Which parameter leaves the perturbation moves: ``mask=`` resolved to one bool per leaf."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fsam_optax._buffers import is_differentiated

Mask = Any  # A pytree of bools (a prefix of the params), or a callable giving one.


def check_mask_leaves(leaves: list[Any], method: str) -> None:
  """Raises a ValueError, naming ``method``, unless every leaf is a concrete scalar bool."""
  for leaf in leaves:
    if isinstance(leaf, jax.core.Tracer) or jnp.ndim(leaf) != 0:
      raise ValueError(
        f"{method}: `mask` leaves must be concrete Python bools, one per parameter "
        f"leaf (or per subtree), got {leaf!r}; mask whole arrays, not elements."
      )


def resolve_mask(mask: Mask | None, params: Any, method: str) -> tuple[bool, ...] | None:
  """One Python bool per differentiated leaf of ``params`` (a callable mask is called on them)."""
  if mask is None:
    return None
  tree = mask(params) if callable(mask) else mask
  leaves = jax.tree.leaves(broadcast_mask(tree, params, method))
  check_mask_leaves(leaves, method)
  kept = [is_differentiated(p) for p in jax.tree.leaves(params)]
  return tuple(bool(leaf) for leaf, k in zip(leaves, kept, strict=True) if k)


def broadcast_mask(mask_tree: Any, params: Any, method: str) -> Any:
  """``mask_tree`` broadcast to the structure of ``params``, or a ValueError."""
  try:
    return jax.tree.broadcast(mask_tree, params)
  except (ValueError, TypeError) as err:
    raise ValueError(
      f"{method}: `mask` must have the structure of the params (or a prefix of it): {err}"
    ) from None


def mask_leaves(mask: tuple[bool, ...] | None, n: int, method: str) -> list[bool]:
  """The resolved mask for ``n`` parameter leaves (all True for ``None``), or a ValueError."""
  if mask is None:
    return [True] * n
  if len(mask) != n:
    raise ValueError(
      f"{method}: the state's `mask` covers {len(mask)} parameter leaves but the params "
      f"have {n}; initialise the optimizer with the same params you pass here."
    )
  return list(mask)
