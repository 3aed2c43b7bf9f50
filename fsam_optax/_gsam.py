"""Surrogate Gap Guided SAM (GSAM) as an Optax transformation.

GSAM perturbs as SAM does, along the clean gradient ``g``, and then removes
part of the component of ``g`` orthogonal to the perturbed gradient ``g'``
from what the base optimizer receives (:meth:`GSAMState.pairs`), which
descends the surrogate gap without changing the perturbed loss to first order.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fsam_optax._config import PerturbationConfig
from fsam_optax._hyperparams import at, check, default_float
from fsam_optax._layout import Layout
from fsam_optax._mask import Mask, mask_leaves, resolve_mask
from fsam_optax._method import Step, method_name, sam_state
from fsam_optax._pairs import SAMGrad
from fsam_optax._perturbation import Direction
from fsam_optax._transformation import advancing_update, check_arguments


@sam_state
class GSAMState(NamedTuple):
  """State of :func:`gsam`.

  Attributes:
    count: number of updates applied so far (int32).
    rho: perturbation radius for the next step (a schedule is evaluated here).
    alpha: weight of the orthogonal component removed from ``g'``.
    eps: added to the norms before dividing by them.
    config: static settings (adaptive mode, mask).
  """

  count: jax.Array  # type: ignore[assignment]
  rho: jax.Array
  alpha: jax.Array
  eps: jax.Array
  config: PerturbationConfig

  def direction(self, grads: list[jax.Array], step: Step) -> Direction:
    """``g`` itself, as SAM (in adaptive mode the perturbation weighs it by ``theta``)."""
    del step
    return Direction(grads, grads)

  def pairs(self, perturbed: Any, clean: Any, step: Step) -> Any:
    """``SAMGrad(g' - alpha * vertical, None)`` at each leaf; ``SAMGrad(g, None)`` on one pass."""
    if not step.sam_step:
      return jax.tree.map(lambda g: SAMGrad(g, None), clean)
    g_prime, treedef = jax.tree.flatten(perturbed)
    g = jax.tree.leaves(clean)
    mask = mask_leaves(self.config.mask, len(g), method_name(self))
    combined = surrogate_gap_gradient(
      g_prime, g, step.hyperparam("alpha"), step.hyperparam("eps"), mask, step.layout
    )
    return jax.tree.unflatten(treedef, [SAMGrad(x, None) for x in combined])


def surrogate_gap_gradient(
  g_prime: list[jax.Array],
  g: list[jax.Array],
  alpha: jax.Array,
  eps: jax.Array,
  mask: list[bool],
  layout: Layout,
) -> list[jax.Array]:
  """``g' - alpha * vertical``, with ``vertical`` the part of ``g`` orthogonal to ``g'``.

  ``cos = <g, g'> / (||g'|| ||g|| + eps)`` and
  ``vertical = g - cos ||g|| g' / (||g'|| + eps)``, with plain (never adaptive)
  norms and inner products of the whole tree of unmasked leaves; a masked
  leaf receives ``g'`` unchanged.
  """
  keep = lambda leaves: [x if k else None for x, k in zip(leaves, mask, strict=True)]
  norm_g = layout.norm(keep(g))
  inner, norm_gp = layout.inner_and_norm(keep(g), keep(g_prime))
  acc = norm_g.dtype
  eps = eps.astype(acc)
  cos = inner / (norm_gp * norm_g + eps)
  scale = cos * norm_g / (norm_gp + eps)
  minus_alpha = -alpha.astype(acc)

  def one(gp: jax.Array, gc: jax.Array) -> jax.Array:
    vertical = gc.astype(acc) - scale * gp.astype(acc)
    return (gp.astype(acc) + minus_alpha * vertical).astype(gp.dtype)

  return [one(gp, gc) if k else gp for gp, gc, k in zip(g_prime, g, mask, strict=True)]


def gsam(
  rho: optax.ScalarOrSchedule = 0.05,
  alpha: float | jax.Array = 0.4,
  *,
  adaptive: bool = False,
  eps: float | jax.Array = 1e-12,
  mask: Mask | None = None,
  skip_nonfinite: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Surrogate Gap Guided Sharpness-Aware Minimization (GSAM).

  GSAM takes SAM's perturbed gradient ``g'`` and removes ``alpha`` times the
  component of the clean gradient ``g`` orthogonal to it, as the authors'
  official code does:

  .. math::
    e &= \rho\, g / (\lVert g \rVert + \epsilon), \qquad
    g' = \nabla L(\theta + e) \\
    \cos &= \langle g, g' \rangle / (\lVert g' \rVert \lVert g \rVert + \epsilon) \\
    v &= g - \cos \lVert g \rVert\, g' / (\lVert g' \rVert + \epsilon)

  and the optimizers after ``gsam`` receive ``g' - alpha v``. Norms and
  inner products are global over all (unmasked) parameters. In adaptive mode
  the perturbation is ASAM's (see :func:`fsam`); the decomposition stays
  plain. ``alpha = 0`` is SAM. The paper lets ``rho`` follow the learning
  rate: build that schedule with :func:`gsam_rho_schedule`.

  ``gsam`` must be first in the chain and be fed by
  :func:`fsam_optax.sam_value_and_grad`. With
  ``perturbation="per_device"`` each data replica perturbs and decomposes
  with its own gradients and only the result is averaged, as the official
  code does under PyTorch DDP.

  Args:
    rho: perturbation radius, ``>= 0``; a scalar or a schedule of the step.
    alpha: weight of the orthogonal component, in ``[0, 1]``.
    adaptive: ASAM-style scale-invariant perturbation.
    eps: added to the norms before dividing, ``> 0``.
    mask: pytree of bools (or a callable of the params returning one); leaves
      that are ``False`` are not perturbed, are left out of the norms and
      inner product, and receive ``g'`` unchanged.
    skip_nonfinite: leave the state unchanged on a step whose gradients are
      not all finite (see :func:`fsam`).

  Returns:
    A :class:`optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax.numpy as jnp, optax, fsam_optax
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> loss = lambda p: jnp.sum(p["w"] ** 4)
    >>> tx = optax.chain(fsam_optax.gsam(rho=0.1, alpha=0.4), optax.sgd(0.01))
    >>> opt_state = tx.init(params)
    >>> value, grads = fsam_optax.sam_value_and_grad(loss)(params, opt_state)
    >>> updates, opt_state = tx.update(grads, opt_state, params)
    >>> print(float(value))
    17.0

  References:
    Zhuang et al., `Surrogate Gap Minimization Improves Sharpness-Aware
    Training <https://arxiv.org/abs/2203.08065>`_, ICLR 2022.
  """
  check_arguments("gsam", rho, eps, mask)
  check("gsam", "alpha", alpha, lambda v: 0 <= v <= 1, "in [0, 1] (0: SAM)")

  def init_fn(params: optax.Params) -> GSAMState:
    config = PerturbationConfig(
      adaptive=bool(adaptive),
      mask=resolve_mask(mask, params, "gsam"),
      skip_nonfinite=bool(skip_nonfinite),
      method="gsam",
    )
    return GSAMState(
      count=jnp.zeros([], jnp.int32),
      rho=at(rho, jnp.zeros([], jnp.int32)),
      alpha=default_float(alpha),
      eps=default_float(eps),
      config=config,
    )

  update_fn = advancing_update("gsam", rho, {"alpha": alpha, "eps": eps}, skip_nonfinite)
  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def gsam_rho_schedule(
  lr_schedule: optax.Schedule,
  *,
  lr_max: float,
  rho_max: float,
  rho_min: float,
  lr_min: float = 0.0,
) -> optax.Schedule:
  """GSAM's radius, following the learning rate: ``rho`` moves from ``rho_min`` to ``rho_max``
  as the learning rate moves from ``lr_min`` to ``lr_max``.

  ``rho_t = rho_min + (rho_max - rho_min) (lr_t - lr_min) / (lr_max - lr_min)``,
  and ``rho_max`` throughout when ``lr_max == lr_min``, as the official code's
  proportional scheduler. Pass the base optimizer's learning-rate schedule:
  both are evaluated at the same step count.

  Args:
    lr_schedule: the learning-rate schedule of the base optimizer.
    lr_max: its largest value.
    rho_max: the radius at ``lr_max``, ``>= rho_min``.
    rho_min: the radius at ``lr_min``, ``>= 0``.
    lr_min: its smallest value (``0`` for a schedule that decays to 0).

  Returns:
    An :class:`optax.Schedule` to pass as ``gsam(rho=...)``.

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
    lr = lr_schedule(count)
    return rho_min + (rho_max - rho_min) * (lr - lr_min) / (lr_max - lr_min)

  return schedule
