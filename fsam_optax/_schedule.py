"""Opt-in schedules that take the (F-)SAM step on some steps only.

On the other steps :func:`fsam_optax.sam_value_and_grad` makes one
forward-backward pass: the base optimizer receives the clean gradient ``g``,
and the F-SAM moving average is still fed ``g`` (it is computed anyway), so it
tracks the gradient exactly as on every-step runs. The step count, and with it
every schedule of ``rho`` and of the base optimizer, advances on every step
(except a non-finite one that ``skip_nonfinite=True`` leaves out).
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

_STATIC = (
  "it is static (it decides what is compiled); under optax.inject_hyperparams "
  "pass static_args=('every', 'probability', 'seed')"
)


def check_schedule(
  every: int | None, probability: float | None, seed: int | None, method: str
) -> tuple[int, float, int]:
  """``(every, probability, seed)`` as plain Python numbers, or a ValueError.

  ``None`` (the default of each) means every step, and seed 0.
  """
  for name, value in (("every", every), ("probability", probability), ("seed", seed)):
    if value is not None and not isinstance(value, numbers.Real):
      raise ValueError(
        f"{method}: `{name}` must be a Python number, got {type(value).__name__}: {_STATIC}."
      )
  if every is not None and (
    isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1
  ):
    raise ValueError(f"{method}: `every` must be an integer >= 1 (1: every step), got {every!r}.")
  if probability is not None and (isinstance(probability, bool) or not 0 < probability <= 1):
    raise ValueError(
      f"{method}: `probability` must be in (0, 1] (1: every step), got {probability!r}; "
      "for no SAM step at all, use the base optimizer alone."
    )
  if every is not None and probability is not None:
    raise ValueError(
      f"{method}: give `every` or `probability`, not both "
      f"(got every={every}, probability={probability})."
    )
  if seed is not None:
    if probability is None:
      raise ValueError(f"{method}: `seed` seeds the `probability` draws; give `probability` too.")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**32:
      raise ValueError(f"{method}: `seed` must be an integer in [0, 2**32), got {seed!r}.")
  return (
    1 if every is None else int(every),
    1.0 if probability is None else float(probability),
    0 if seed is None else int(seed),
  )


def is_sam_step(every: int, probability: float, seed: int, count: jax.Array) -> jax.Array | None:
  """Whether step ``count`` (0 for the first) takes the SAM step.

  ``None`` when every step does, which is known before tracing. ``every=k``
  chooses steps ``0, k, 2k, ...``; ``probability=p`` draws
  ``uniform(fold_in(key(seed), count)) < p``, a function of the seed and the
  count only, so every device (they share the count) makes the same choice
  and the state holds no key.

  Example:
    >>> import jax.numpy as jnp
    >>> from fsam_optax._schedule import is_sam_step
    >>> [bool(is_sam_step(3, 1.0, 0, jnp.int32(t))) for t in range(5)]
    [True, False, False, True, False]
  """
  if every > 1:
    return count % every == 0
  if probability < 1:
    key = jax.random.fold_in(jax.random.key(seed), count)
    return jax.random.uniform(key, dtype=jnp.float32) < probability
  return None
