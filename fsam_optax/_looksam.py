"""LookSAM: SAM every ``k`` steps, its correction reused on the one-pass steps between."""

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


class LookSAMState(NamedTuple):
  """State of :func:`looksam`.

  Attributes:
    count: number of updates applied so far (int32).
    rho: perturbation radius for the next SAM step (a schedule is evaluated here).
    alpha: weight of the reused component on the steps between SAM steps.
    eps: added to the norms before dividing by them.
    config: static settings (mask, and ``every``: the SAM steps).
    g_v: the component of the last SAM step's ``g'`` orthogonal to its ``g``
      (float32 for narrower params).
  """

  count: jax.Array  # type: ignore[assignment]
  rho: jax.Array
  alpha: jax.Array
  eps: jax.Array
  config: PerturbationConfig
  g_v: optax.Updates

  def direction(self, grads: Leaves, step: SAMStep) -> Leaves:
    """``g`` itself, as SAM."""
    return grads

  def combine(self, perturbed: Leaves, clean: Leaves, step: SAMStep) -> list[SAMGrad]:
    """``g'`` and a new ``g_v`` on a SAM step; between, the reused gradient and the old ``g_v``."""
    g_v = jax.tree.leaves(self.g_v)
    eps = step.hyperparam("eps")
    if step.two_pass:
      norm_g = step.norm(clean)
      scale = step.inner(clean, perturbed) / (norm_g**2 + eps.astype(norm_g.dtype))
      acc = scale.dtype
      kept = [
        (gp.astype(acc) - scale * g.astype(acc)).astype(v.dtype)
        for gp, g, v in zip(perturbed, clean, g_v, strict=True)
      ]
      return [
        SAMGrad(gp, v) for gp, v in zip(perturbed, step.where_perturbed(kept, g_v), strict=True)
      ]
    norm_g, norm_v = step.norm(clean), step.norm(g_v)
    acc = jnp.promote_types(norm_g.dtype, norm_v.dtype)
    alpha = step.hyperparam("alpha").astype(acc)
    scale = alpha * (norm_g.astype(acc) / (norm_v.astype(acc) + eps.astype(acc)))
    reused = [
      (g.astype(acc) + scale * v.astype(acc)).astype(g.dtype)
      for g, v in zip(clean, g_v, strict=True)
    ]
    return [SAMGrad(r, v) for r, v in zip(step.where_perturbed(reused, clean), g_v, strict=True)]


def looksam(
  rho: optax.ScalarOrSchedule = 0.05,
  every: int = 5,
  alpha: float | jax.Array = 0.7,
  *,
  eps: float | jax.Array = 1e-12,
  mask: Mask | None = None,
  g_v_dtype: Any | None = None,
  skip_nonfinite: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""LookSAM: the SAM step every ``every`` steps, its correction reused in between.

  As the paper's Algorithm 1, with whole-model vectors. On a SAM step the state
  keeps the part of ``g'`` orthogonal to ``g``:

  .. math::
    g_v = g' - \frac{\langle g, g' \rangle}{\lVert g \rVert^2 + \epsilon}\, g

  and the base optimizer receives ``g'``; on the steps between it receives
  ``g + alpha (||g|| / (||g_v|| + eps)) g_v``, at the current weights.

  SAM's perturbation ``e = rho g / (||g|| + eps)`` on steps ``0, every, 2 every,
  ...``; the other steps cost one pass. ``every = 1`` is SAM; ``alpha = 0``
  is SAM every ``every`` steps with plain gradients between. With
  ``perturbation="per_device"`` each replica computes ``g_v`` and the reused
  gradient from its own gradients, and both are averaged.

  Args:
    rho: perturbation radius, ``>= 0``; a scalar or a schedule of the step.
    every: take the SAM step every ``every`` steps (``k`` in the paper), an
      integer ``>= 1``. Static: under ``optax.inject_hyperparams`` name it in
      ``static_args``.
    alpha: weight of the reused component, ``>= 0``.
    eps: added to the norms before dividing, ``> 0``.
    mask: pytree of bools (or a callable of the params returning one); leaves
      that are ``False`` are not perturbed, are left out of the norms, and
      receive the gradient unchanged.
    g_v_dtype: dtype of the kept component; by default float32 for params
      narrower than float32, the param's dtype otherwise.
    skip_nonfinite: leave the state unchanged on a non-finite step (see :func:`fsam`).

  Returns:
    A :class:`optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax.numpy as jnp, optax, fsam_optax
    >>> tx = optax.chain(fsam_optax.looksam(rho=0.1, every=5), optax.sgd(0.01))
    >>> opt_state = tx.init({"w": jnp.array([1.0, -2.0])})
    >>> [fsam_optax.is_sam_step(opt_state, i) for i in range(6)]
    [True, False, False, False, False, True]

  References:
    Liu et al., `Towards Efficient and Scalable Sharpness-Aware Minimization
    <https://arxiv.org/abs/2203.02714>`_, CVPR 2022.
  """
  if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
    raise ValueError(
      f"looksam: `every` must be an integer >= 1 (1: SAM on every step), got {every!r}; "
      "it is static: under optax.inject_hyperparams pass static_args=('every',)."
    )
  check("looksam", "alpha", alpha, lambda v: v >= 0, ">= 0 (0: plain gradients between SAM steps)")
  return method_transformation(
    LookSAMState,
    "looksam",
    rho=rho,
    eps=eps,
    scalars={"alpha": alpha},
    buffer="g_v",
    buffer_dtype=g_v_dtype,
    mask=mask,
    every=int(every),
    skip_nonfinite=skip_nonfinite,
  )
