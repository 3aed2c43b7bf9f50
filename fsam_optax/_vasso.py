"""Variance Suppressed Sharpness-Aware Optimization (VaSSO): perturb along the average."""

from __future__ import annotations

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


class VaSSOState(NamedTuple):
  """State of :func:`vasso`.

  Attributes:
    count: number of updates applied so far (int32).
    rho: perturbation radius for the next step (a schedule is evaluated here).
    theta: weight of the new gradient in the moving average.
    eps: added to the average's norm before dividing by it.
    config: static settings (mask).
    ema: moving average ``m`` of clean gradients (float32 for narrower params).
  """

  count: jax.Array  # type: ignore[assignment]
  rho: jax.Array
  theta: jax.Array
  eps: jax.Array
  config: PerturbationConfig
  ema: optax.Updates

  def direction(self, grads: Leaves, step: SAMStep) -> Leaves:
    """The moving average updated with this step's ``g``."""
    return self._updated(grads, step)

  def combine(self, perturbed: Leaves, clean: Leaves, step: SAMStep) -> list[SAMGrad]:
    """``g'`` to the base optimizer; the state keeps the updated average.

    The same expression as the direction's, so XLA computes it once for both.
    """
    return [SAMGrad(gp, m) for gp, m in zip(perturbed, self._updated(clean, step), strict=True)]

  def _updated(self, grads: Leaves, step: SAMStep) -> Leaves:
    """``(1 - theta) m + theta g`` in the average's dtypes, and ``g`` at count 0."""
    ema = jax.tree.leaves(self.ema)
    weight = jnp.where(self.count == 0, 1.0, step.hyperparam("theta"))

    def one(m: jax.Array, g: jax.Array) -> jax.Array:
      a = weight.astype(jnp.promote_types(m.dtype, jnp.float32))
      return ((1 - a) * m + a * g).astype(m.dtype)

    return [one(m, g) for m, g in zip(ema, grads, strict=True)]


def vasso(
  rho: optax.ScalarOrSchedule = 0.05,
  theta: float | jax.Array = 0.4,
  *,
  eps: float | jax.Array = 1e-7,
  mask: Mask | None = None,
  ema_dtype: Any | None = None,
  skip_nonfinite: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Variance Suppressed Sharpness-Aware Optimization (VaSSO).

  As the authors' official code, the moving average is updated with the step's
  gradient first, and the perturbation goes along it:

  .. math::
    m_t &= (1 - \theta) m_{t-1} + \theta g_t, \qquad m_1 = g_1 \\
    e_t &= \rho\, m_t / (\lVert m_t \rVert + \epsilon)

  and the base optimizer receives ``g'_t``, the gradient at ``theta + e_t``.
  Where F-SAM perturbs along ``g - sigma m`` (the minibatch's noise), VaSSO
  perturbs along ``m`` itself, a lower-variance estimate of the full gradient.

  The norm is global over all (unmasked) parameters; ``theta = 1`` is SAM.
  With ``perturbation="per_device"`` each data replica perturbs along the
  average updated with its own gradient, and the state is fed the averaged one.

  Args:
    rho: perturbation radius, ``>= 0``; a scalar or a schedule of the step.
    theta: weight of the new gradient in the moving average, in ``[0, 1]``.
    eps: added to the norm before dividing, ``> 0`` (the official code's 1e-7).
    mask: pytree of bools (or a callable of the params returning one); leaves
      that are ``False`` are not perturbed and are left out of the norm.
    ema_dtype: dtype of the moving average; by default float32 for params
      narrower than float32, the param's dtype otherwise.
    skip_nonfinite: leave the state unchanged on a non-finite step (see :func:`fsam`).

  Returns:
    A :class:`optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax.numpy as jnp, optax, fsam_optax
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> tx = optax.chain(fsam_optax.vasso(rho=0.1, theta=0.4), optax.sgd(0.1))
    >>> opt_state = tx.init(params)
    >>> grad_fn = fsam_optax.sam_value_and_grad(lambda p: jnp.sum(p["w"] ** 2))
    >>> for _ in range(2):
    ...   value, grads = grad_fn(params, opt_state)
    ...   updates, opt_state = tx.update(grads, opt_state, params)
    >>> print(opt_state[0].ema["w"])
    [ 2. -4.]

  References:
    Li and Giannakis, `Enhancing Sharpness-Aware Optimization Through Variance
    Suppression <https://arxiv.org/abs/2309.15639>`_, NeurIPS 2023.
  """
  check("vasso", "theta", theta, lambda v: 0 <= v <= 1, "in [0, 1] (1: SAM)")
  return method_transformation(
    VaSSOState,
    "vasso",
    rho=rho,
    eps=eps,
    scalars={"theta": theta},
    buffer="ema",
    buffer_dtype=ema_dtype,
    mask=mask,
    skip_nonfinite=skip_nonfinite,
  )
