"""Methods that each break one property of ``fsam_optax.testing``, for ``test_conformance.py``.

The suite loads this file by its path, as it loads a method defined in a standalone file.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

import fsam_optax


def unit_updates(**options: Any) -> optax.GradientTransformation:
  """SAM that scales what it hands on to norm 1 with ``optax.global_norm``: inside
  ``shard_map`` that norm sees only the device's shards of split params."""
  inner = fsam_optax.sam(rho=0.1, **options)

  def update_fn(updates: Any, state: Any, params: Any = None, **extra_args: Any) -> Any:
    updates, state = inner.update(updates, state, params, **extra_args)
    norm = optax.global_norm(updates)
    return jax.tree.map(lambda u: u / norm, updates), state

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def _fixed_rho(rho: float = 0.1, *, skip_nonfinite: bool = False) -> optax.GradientTransformation:
  """SAM that ignores the ``rho`` it is given."""
  del rho
  return fsam_optax.sam(rho=0.1, skip_nonfinite=skip_nonfinite)


fixed_rho = functools.partial(_fixed_rho, rho=0.2)


def widening_count(**options: Any) -> optax.GradientTransformation:
  """SAM whose update stores its count as int64 (under float64): the next step retraces."""
  inner = fsam_optax.sam(rho=0.1, **options)

  def update_fn(updates: Any, state: Any, params: Any = None, **extra_args: Any) -> Any:
    updates, state = inner.update(updates, state, params, **extra_args)
    return updates, state._replace(count=state.count.astype(jnp.int64))

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)
