"""Variance Suppressed Sharpness-Aware Optimization (VaSSO) as an Optax transformation.

The state holds a moving average ``m`` of clean gradients, updated with the
step's ``g`` before it is used: the perturbation goes along the new ``m``
(:meth:`VaSSOState.direction`), a lower-variance estimate of the full
gradient than ``g`` itself, and the pairs hand that same average to the
update, which stores it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fsam_optax._buffers import zeros_buffer
from fsam_optax._config import PerturbationConfig
from fsam_optax._hyperparams import at, check, default_float
from fsam_optax._mask import Mask, resolve_mask
from fsam_optax._method import Step, method_name, sam_state
from fsam_optax._pairs import SAMGrad
from fsam_optax._perturbation import Direction
from fsam_optax._transformation import advancing_update, check_arguments


@sam_state
class VaSSOState(NamedTuple):
  """State of :func:`vasso`.

  Attributes:
    count: number of updates applied so far (int32).
    rho: perturbation radius for the next step (a schedule is evaluated here).
    theta: weight of the new gradient in the moving average.
    eps: added to the average's norm before dividing by it.
    ema: moving average ``m`` of clean gradients (float32 for narrower params).
    config: static settings (mask).
  """

  count: jax.Array  # type: ignore[assignment]
  rho: jax.Array
  theta: jax.Array
  eps: jax.Array
  ema: optax.Updates
  config: PerturbationConfig

  def direction(self, grads: list[jax.Array], step: Step) -> Direction:
    """The moving average updated with this step's ``g``: ``(1 - theta) m + theta g``."""
    ema = jax.tree.leaves(self.ema)
    if len(ema) != len(grads):
      raise ValueError(
        f"sam_value_and_grad: params have {len(grads)} leaves but the moving average of "
        f"the {method_name(self)} state covers {len(ema)}; initialise the optimizer with "
        "the same params you pass here."
      )
    m = updated_average(ema, grads, step.hyperparam("theta"), self.count)
    return Direction(m, m)

  def pairs(self, perturbed: Any, clean: Any, step: Step) -> Any:
    """``SAMGrad(g', None, m)``: the base optimizer gets ``g'``, the state keeps the new ``m``.

    ``m`` is the step's spelling of the direction, so XLA computes it once for
    the perturbation and the state.
    """
    g_prime, treedef = jax.tree.flatten(perturbed)
    m = updated_average(
      jax.tree.leaves(self.ema), jax.tree.leaves(clean), step.hyperparam("theta"), self.count
    )
    return jax.tree.unflatten(
      treedef, [SAMGrad(gp, None, x) for gp, x in zip(g_prime, m, strict=True)]
    )


def updated_average(
  ema: list[jax.Array],
  grads: list[jax.Array],
  theta: float | jax.Array,
  count: jax.Array,
) -> list[jax.Array]:
  """``(1 - theta) m + theta g`` leaf by leaf in the average's dtypes, and ``g`` at count 0.

  The first step's rule (``m = g``, the official code's initialisation) is
  ``theta = 1`` on that step.
  """
  weight = jnp.where(count == 0, 1.0, theta)

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

  VaSSO perturbs along a moving average of the gradients, updated with the
  step's gradient first, as the authors' official code does:

  .. math::
    m_t &= (1 - \theta) m_{t-1} + \theta g_t, \qquad m_1 = g_1 \\
    e_t &= \rho\, m_t / (\lVert m_t \rVert + \epsilon)

  and the optimizers after ``vasso`` receive ``g'_t``, the gradient at
  ``theta + e_t``. The norm is global over all (unmasked) parameters.
  ``theta = 1`` is SAM. Where F-SAM perturbs along ``g - sigma m`` (the
  minibatch's noise), VaSSO perturbs along ``m`` itself.

  ``vasso`` must be first in the chain and be fed by
  :func:`fsam_optax.sam_value_and_grad`. With ``perturbation="per_device"``
  each data replica perturbs along the average updated with its own
  gradient, and the state is fed the averaged one.

  Args:
    rho: perturbation radius, ``>= 0``; a scalar or a schedule of the step.
    theta: weight of the new gradient in the moving average, in ``[0, 1]``.
    eps: added to the norm before dividing, ``> 0`` (the official code's 1e-7).
    mask: pytree of bools (or a callable of the params returning one); leaves
      that are ``False`` are not perturbed and are left out of the norm.
    ema_dtype: dtype of the moving average. By default float32 for params
      narrower than float32, and the param's dtype otherwise (see :func:`fsam`).
    skip_nonfinite: leave the state unchanged on a step whose gradients are
      not all finite (see :func:`fsam`).

  Returns:
    A :class:`optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax.numpy as jnp, optax, fsam_optax
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> loss = lambda p: jnp.sum(p["w"] ** 2)
    >>> tx = optax.chain(fsam_optax.vasso(rho=0.1, theta=0.4), optax.sgd(0.1))
    >>> opt_state = tx.init(params)
    >>> grad_fn = fsam_optax.sam_value_and_grad(loss)
    >>> for _ in range(2):
    ...   value, grads = grad_fn(params, opt_state)
    ...   updates, opt_state = tx.update(grads, opt_state, params)
    >>> print(opt_state[0].ema["w"])
    [ 2. -4.]

  References:
    Li and Giannakis, `Enhancing Sharpness-Aware Optimization Through Variance
    Suppression <https://arxiv.org/abs/2309.15639>`_, NeurIPS 2023.
  """
  check_arguments("vasso", rho, eps, mask)
  check("vasso", "theta", theta, lambda v: 0 <= v <= 1, "in [0, 1] (1: SAM)")
  if ema_dtype is not None:
    ema_dtype = jnp.dtype(ema_dtype)

  def init_fn(params: optax.Params) -> VaSSOState:
    config = PerturbationConfig(
      mask=resolve_mask(mask, params, "vasso"),
      skip_nonfinite=bool(skip_nonfinite),
      method="vasso",
    )
    return VaSSOState(
      count=jnp.zeros([], jnp.int32),
      rho=at(rho, jnp.zeros([], jnp.int32)),
      theta=default_float(theta),
      eps=default_float(eps),
      ema=zeros_buffer(params, ema_dtype),
      config=config,
    )

  scalars = {"theta": theta, "eps": eps}
  update_fn = advancing_update("vasso", rho, scalars, skip_nonfinite, carried="ema")
  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
