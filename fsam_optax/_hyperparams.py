"""Checking and storing the scalar hyperparameters of a SAM-family transformation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax


def _concrete(method: str, name: str, value: Any) -> float | None:
  """Returns ``value`` as a float when it is known now, else ``None``."""
  if callable(value) or isinstance(value, jax.core.Tracer):
    return None
  if jnp.ndim(value) != 0:
    raise ValueError(
      f"{method}: expected a scalar hyperparameter `{name}`, got shape {jnp.shape(value)}."
    )
  return float(value)


def check(
  method: str,
  name: str,
  value: Any,
  ok: Callable[[float], bool],
  allowed: str,
  *,
  schedule: bool = False,
) -> None:
  """Raises a ValueError naming ``method`` and ``name`` if its concrete value is not ``allowed``.

  A schedule (a callable) is accepted where ``schedule`` is true, and checked
  by nobody; so is a traced value (``inject_hyperparams``), as optax's own
  transformations do.
  """
  if callable(value) and not schedule:
    raise ValueError(
      f"{method}: `{name}` must be a number or a scalar array, not a schedule "
      f"(use optax.inject_hyperparams to change `{name}` during training)."
    )
  v = _concrete(method, name, value)
  if v is not None and not ok(v):
    raise ValueError(f"{method}: `{name}` must be {allowed}, got {v!r}.")


def default_float(x: Any) -> jax.Array:
  """``x`` as a float array of the default dtype.

  float64 when x64 is on, float32 otherwise; never weakly typed, so that the
  state keeps one dtype through init, update, scan and cond.
  """
  return jnp.asarray(x, dtype=jnp.result_type(float))


def at(value: optax.ScalarOrSchedule, count: jax.Array) -> jax.Array:
  """``value`` at step ``count``: the number itself, or the schedule evaluated."""
  if not callable(value):
    return default_float(value)
  # An int32 count would make optax's schedules compute in float32 even when
  # x64 is on; the default integer keeps the run's precision.
  return default_float(value(count.astype(jnp.result_type(int))))
