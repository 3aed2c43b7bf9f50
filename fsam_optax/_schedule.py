"""Opt-in schedules that take the (F-)SAM step on some steps only.

On the other steps :func:`fsam_optax.sam_value_and_grad` makes one
forward-backward pass: the base optimizer receives the clean gradient ``g``,
and the F-SAM moving average is still fed ``g`` (it is computed anyway), so it
tracks the gradient exactly as on every-step runs. The step count, and with it
every schedule of ``rho`` and of the base optimizer, advances on every step
(except a non-finite one that ``skip_nonfinite=True`` leaves out).

The rule is decided on the device from the state's count
(:func:`device_choice`, a ``lax.cond`` in the step) or on the host from the
loop's counter (:func:`fsam_optax.is_sam_step`, for ``sam_step=``); both
give the same answer for the same count.
"""

from __future__ import annotations

import functools
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fsam_optax._lookup import find_sam_state

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


def device_choice(every: int, probability: float, seed: int, count: jax.Array) -> jax.Array | None:
  """Whether step ``count`` (0 for the first) takes the SAM step, as a traced bool.

  ``None`` when every step does, which is known before tracing. ``every=k``
  chooses steps ``0, k, 2k, ...``; ``probability=p`` draws
  ``uniform(fold_in(key(seed), count)) < p`` with the threefry PRNG (whatever
  ``jax_default_prng_impl`` is), a function of the seed and the count only:
  every device (they share the count) and the host (:func:`is_sam_step`)
  make the same choice, and the state holds no key.

  Example:
    >>> import jax.numpy as jnp
    >>> from fsam_optax._schedule import device_choice
    >>> [bool(device_choice(3, 1.0, 0, jnp.int32(t))) for t in range(5)]
    [True, False, False, True, False]
  """
  if every > 1:
    return count % every == 0
  if probability < 1:
    key = jax.random.fold_in(jax.random.key(seed, impl="threefry2x32"), count)
    return jax.random.uniform(key, dtype=jnp.float32) < probability
  return None


# The host draws this many counts at a time, on the CPU, and keeps the last blocks.
_BLOCK = 4096
_MAX_COUNT = 2**31 - 1  # the state's int32 count stops here (optax.safe_increment)


def is_sam_step(opt_state: Any, step: int) -> bool:
  """Whether update number ``step`` takes the SAM step, decided on the host.

  The schedule of the SAM-family method in ``opt_state`` (``fsam``'s and
  ``sam``'s ``every``, ``probability`` and ``seed``, LookSAM's ``every``),
  applied to ``step`` as the device applies it to the state's count: pass
  the result as ``sam_step=`` to the gradient function, so that the compiled
  step holds no conditional and a one-pass step launches one pass. A method
  without a schedule (``gsam``, ``vasso``, or ``every=1``) answers ``True``.

  It reads the state's static settings only, never its arrays, so it does not
  wait for the device; the ``probability`` draws run on the CPU, a block of
  counts at a time. ``step`` is the loop's own counter of updates, from 0.
  It equals the state's count as long as every update is applied; with
  ``skip_nonfinite=True`` a refused step does not advance the count, and
  the loop's counter runs ahead of it by the number of refused steps
  (which shifts the choices without changing their rate).

  Args:
    opt_state: the optimizer's state, or an ``nnx.Optimizer``, as the
      gradient function takes it.
    step: the update's number, a Python int ``>= 0`` (0 for the first).

  Returns:
    A Python bool.

  Example:
    >>> import jax.numpy as jnp, optax, fsam_optax
    >>> tx = optax.chain(fsam_optax.fsam(every=3), optax.sgd(0.1))
    >>> opt_state = tx.init({"w": jnp.zeros(2)})
    >>> [fsam_optax.is_sam_step(opt_state, i) for i in range(5)]
    [True, False, False, True, False]
  """
  if isinstance(step, bool) or not isinstance(step, numbers.Integral):
    raise ValueError(
      "is_sam_step: `step` must be a Python int, the loop's own counter of updates "
      f"(0 for the first), got {type(step).__name__}; reading the state's count "
      "instead would wait for the device."
    )
  if not 0 <= step <= _MAX_COUNT:
    raise ValueError(f"is_sam_step: `step` must be in [0, 2**31 - 1], got {step}.")
  every, probability, seed = find_sam_state(opt_state, caller="is_sam_step").state.config.schedule
  if every > 1:
    return step % every == 0
  if probability < 1:
    block, at = divmod(int(step), _BLOCK)
    return bool(_host_draws(probability, seed, block)[at])
  return True


@functools.lru_cache(maxsize=8)
def _host_draws(probability: float, seed: int, block: int) -> np.ndarray:
  """:func:`device_choice` for counts ``block * _BLOCK ...`` up to the next block, on the CPU."""
  counts = np.arange(block * _BLOCK, (block + 1) * _BLOCK, dtype=np.int64)
  counts = np.minimum(counts, _MAX_COUNT).astype(np.int32)
  return np.asarray(_draw_block(probability, seed, jax.device_put(counts, _cpu())))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _draw_block(probability: float, seed: int, counts: jax.Array) -> jax.Array:
  def draw(count: jax.Array) -> jax.Array:
    choice = device_choice(1, probability, seed, count)
    assert choice is not None  # probability < 1: a draw
    return choice

  return jax.vmap(draw)(counts)


def _cpu() -> jax.Device:
  """The host's CPU device (the default device where no CPU backend was loaded)."""
  try:
    return jax.local_devices(backend="cpu")[0]
  except RuntimeError:
    return jax.local_devices()[0]
