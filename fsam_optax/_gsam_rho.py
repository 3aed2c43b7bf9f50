"""GSAM's radius following the learning rate, as the official code's proportional scheduler."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def gsam_rho_schedule(
  lr_schedule: optax.Schedule, *, lr_max: float, rho_max: float, rho_min: float, lr_min: float = 0.0
) -> optax.Schedule:
  """GSAM's radius, from ``rho_min`` at ``lr_min`` to ``rho_max`` at ``lr_max``, linear in lr.

  ``rho_t = rho_min + (rho_max - rho_min) (lr_t - lr_min) / (lr_max - lr_min)``
  (``rho_max`` throughout when ``lr_max == lr_min``), as the official code's
  proportional scheduler; pass the base optimizer's learning-rate schedule.

  Example:
    >>> import optax, fsam_optax
    >>> lr = optax.cosine_decay_schedule(0.1, decay_steps=100)
    >>> rho = fsam_optax.gsam_rho_schedule(lr, lr_max=0.1, rho_max=0.6, rho_min=0.1)
    >>> [round(float(rho(t)), 4) for t in (0, 50, 100)]
    [0.6, 0.35, 0.1]
  """
  if not callable(lr_schedule):
    raise ValueError(
      f"gsam_rho_schedule: `lr_schedule` must be an optax schedule (a callable of the "
      f"step), got {type(lr_schedule).__name__}; for a constant learning rate use a "
      "constant rho."
    )
  if not lr_max >= lr_min:
    raise ValueError(f"gsam_rho_schedule: `lr_max` must be >= `lr_min`, got {lr_max} < {lr_min}.")
  if not 0 <= rho_min <= rho_max:
    raise ValueError(
      f"gsam_rho_schedule: needs 0 <= `rho_min` <= `rho_max`, got rho_min={rho_min}, "
      f"rho_max={rho_max}."
    )

  def schedule(count: jax.Array) -> jax.Array:
    if lr_max == lr_min:
      return jnp.asarray(rho_max, dtype=jnp.result_type(float))
    return rho_min + (rho_max - rho_min) * (lr_schedule(count) - lr_min) / (lr_max - lr_min)

  return schedule
