"""Friendly Sharpness-Aware Minimization (F-SAM): perturb along the gradient's noise."""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fsam_optax._config import PerturbationConfig
from fsam_optax._hyperparams import check
from fsam_optax._mask import Mask
from fsam_optax._method import Leaves, SAMStep
from fsam_optax._pairs import SAMGrad
from fsam_optax._transformation import method_transformation


class FSAMState(NamedTuple):
  """State of :func:`fsam` (and :func:`sam`, whose ``ema`` is ``None``).

  Attributes:
    count: number of updates applied so far (int32).
    rho, sigma, lmbda, eps: the hyperparameters (``rho`` at the count).
    config: static settings (adaptive mode, mask, which steps take the SAM step).
    ema: moving average ``m`` of clean gradients, or ``None`` for plain SAM.
  """

  # Optax states name their step count `count`, which shadows tuple.count.
  count: jax.Array  # type: ignore[assignment]
  rho: jax.Array
  sigma: jax.Array
  lmbda: jax.Array
  eps: jax.Array
  config: PerturbationConfig
  ema: optax.Updates | None = None

  def direction(self, grads: Leaves, step: SAMStep) -> Leaves:
    """``d = g - sigma m`` (``g`` for plain SAM), in the gradients' dtypes."""
    return self._spelt(grads, step, lambda g, sigma, m: g - sigma * m)

  def _direction_for_step(self, grads: Leaves, step: SAMStep) -> Leaves:
    # d spelt g + (-sigma) m, which XLA does not merge with the norm's spelling:
    # each kernel computes d instead of storing it, one parameter-size buffer
    # less traffic (benchmarks/traffic.py).
    return self._spelt(grads, step, lambda g, sigma, m: g + (-sigma) * m)

  def _spelt(self, grads: Leaves, step: SAMStep, spell: Any) -> Leaves:
    if self.ema is None:
      return grads
    sigma, ema = step.hyperparam("sigma"), jax.tree.leaves(self.ema)
    return [spell(g, sigma, m).astype(g.dtype) for g, m in zip(grads, ema, strict=True)]

  def combine(self, perturbed: Leaves, clean: Leaves, step: SAMStep) -> list[SAMGrad]:
    """``g'`` to the base optimizer; the average fed ``g`` (``m = g`` on the first step)."""
    if self.ema is None:
      return [SAMGrad(gp) for gp in perturbed]
    decay = jnp.where(self.count == 0, 0.0, step.hyperparam("lmbda"))

    def average(m: jax.Array, g: jax.Array) -> jax.Array:
      # In at least float32: a float32 lmbda would round 1 - lmbda for float64.
      a = decay.astype(jnp.promote_types(m.dtype, jnp.float32))
      return (a * m + (1 - a) * g).astype(m.dtype)

    ema = jax.tree.leaves(self.ema)
    return [SAMGrad(gp, average(m, g)) for gp, m, g in zip(perturbed, ema, clean, strict=True)]


def fsam(
  rho: optax.ScalarOrSchedule = 0.05,
  sigma: float | jax.Array = 1.0,
  lmbda: float | jax.Array = 0.9,
  *,
  adaptive: bool = False,
  eps: float | jax.Array = 1e-12,
  mask: Mask | None = None,
  every: int | None = None,
  probability: float | None = None,
  seed: int | None = None,
  ema_dtype: Any | None = None,
  skip_nonfinite: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Friendly Sharpness-Aware Minimization (F-SAM).

  Step for step as the authors' official code:

  .. math::
    d_t &= g_t - \sigma m_{t-1}, \qquad d_1 = g_1 \\
    m_t &= \lambda m_{t-1} + (1 - \lambda) g_t, \qquad m_1 = g_1 \\
    e_t &= \rho\, d_t / (\lVert d_t \rVert + \epsilon)

  and the base optimizer receives ``g'_t``, the gradient at ``theta + e_t``:
  where SAM moves uphill along ``g``, F-SAM moves along its noise only. The
  norm is global over all (unmasked) parameters; in adaptive mode (the PyTorch
  SAM code's form) it is that of ``|theta| d``, and ``e = rho theta^2 d /
  (norm + eps)``. ``sigma = 0`` is :func:`sam`, which keeps no average.

  Args:
    rho: perturbation radius, ``>= 0``; a scalar or a schedule of the step.
    sigma: how much of the moving average to remove, ``>= 0``. A Python ``0``
      keeps no moving average (plain SAM).
    lmbda: decay of the moving average, in ``[0, 1)``.
    adaptive: the PyTorch SAM code's adaptive perturbation (``|theta|``, no ``eta``).
    eps: added to the norm before dividing, ``> 0``.
    mask: pytree of bools (or a callable of the params): ``False`` leaves stay.
    every: take the F-SAM step on steps ``0, every, 2 every, ...`` only; the
      others cost one pass and hand on ``g`` (the average is fed every ``g``).
    probability: or take it with this probability, in ``(0, 1]``, drawn from
      ``seed`` and the count. These three, ``mask`` and ``ema_dtype`` are static
      (under ``inject_hyperparams``, name them in ``static_args``).
    seed: seed of the ``probability`` draws (default 0).
    ema_dtype: the average's dtype (default: float32 below float32, else the param's).
    skip_nonfinite: leave the state unchanged on a non-finite step, for
      ``optax.apply_if_finite(base, k)`` after it (float16 loss scaling).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`, first in the chain.

  Example:
    >>> import jax.numpy as jnp, optax, fsam_optax
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> tx = optax.chain(fsam_optax.fsam(0.2, 1.0, 0.6), optax.sgd(0.05, momentum=0.9))
    >>> grad_fn = fsam_optax.sam_value_and_grad(lambda p, x: jnp.sum((p["w"] * x) ** 2))
    >>> value, grads = grad_fn(params, tx.init(params), jnp.array([1.0, 0.5]))
    >>> print(float(value))
    2.0

  References:
    Li et al., `Friendly Sharpness-Aware Minimization
    <https://arxiv.org/abs/2403.12350>`_, CVPR 2024.
  """
  check("fsam", "sigma", sigma, lambda v: v >= 0, ">= 0")
  check("fsam", "lmbda", lmbda, lambda v: 0 <= v < 1, "in [0, 1)")
  # Only a concrete Python zero drops the buffer: a traced sigma (for example
  # under inject_hyperparams) keeps it, so init and update agree on structure.
  plain = isinstance(sigma, numbers.Real) and sigma == 0
  buffer: dict[str, Any] = dict(buffer=None if plain else "ema", buffer_dtype=ema_dtype)
  options: dict[str, Any] = dict(adaptive=adaptive, mask=mask, skip_nonfinite=skip_nonfinite)
  schedule: dict[str, Any] = dict(every=every, probability=probability, seed=seed)
  scalars = {"sigma": sigma, "lmbda": lmbda}
  return method_transformation(
    FSAMState, "fsam", rho=rho, eps=eps, scalars=scalars, **buffer, **options, **schedule
  )
