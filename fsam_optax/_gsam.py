"""Surrogate Gap Guided SAM (GSAM): SAM's ``g'`` minus part of ``g`` orthogonal to it."""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fsam_optax._config import PerturbationConfig
from fsam_optax._hyperparams import check
from fsam_optax._mask import Mask
from fsam_optax._method import Direction, Leaves, SAMStep
from fsam_optax._pairs import SAMGrad
from fsam_optax._transformation import method_transformation


class GSAMState(NamedTuple):
  """State of :func:`gsam`.

  Attributes:
    count: number of updates applied so far (int32).
    rho: perturbation radius for the next step (a schedule is evaluated here).
    alpha: weight of the orthogonal component removed from ``g'``.
    eps: added to the norms before dividing by them.
    config: static settings (adaptive mode, mask; ``minimize`` and ``relative``
      among its options).
  """

  count: jax.Array  # type: ignore[assignment]
  rho: jax.Array
  alpha: jax.Array
  eps: jax.Array
  config: PerturbationConfig

  def direction(self, grads: Leaves, step: SAMStep) -> Leaves | Direction:
    """``g`` itself, as SAM, or ``|theta| g`` over ``||g||`` with ``relative=True``."""
    if self.config.option("relative"):
      # |theta| g in at least float32: in float16 it overflows already at |theta|, |g| ~ 300.
      acc = jnp.result_type(jnp.float32, *(g.dtype for g in grads))
      weighted = [
        jnp.abs(p).astype(acc) * g.astype(acc) for p, g in zip(step.params, grads, strict=True)
      ]
      return Direction(weighted, step.norm(grads))
    return grads

  def combine(self, perturbed: Leaves, clean: Leaves, step: SAMStep) -> list[SAMGrad]:
    """The combination ``minimize`` names (plain norms); ``g`` on a one-pass step."""
    if not step.two_pass:
      return [SAMGrad(g) for g in clean]
    if self.config.option("minimize") == "clean":
      return _clean_plus_orthogonal(perturbed, clean, step)
    norm_g = step.norm(clean)
    inner, norm_gp = step.inner_and_norm(clean, perturbed)
    acc = norm_g.dtype
    eps = step.hyperparam("eps").astype(acc)
    scale = inner / (norm_gp * norm_g + eps) * norm_g / (norm_gp + eps)
    minus_alpha = -step.hyperparam("alpha").astype(acc)

    def one(gp: jax.Array, g: jax.Array) -> jax.Array:
      vertical = g.astype(acc) - scale * gp.astype(acc)
      return (gp.astype(acc) + minus_alpha * vertical).astype(gp.dtype)

    combined = [one(gp, g) for gp, g in zip(perturbed, clean, strict=True)]
    return [SAMGrad(x) for x in step.where_perturbed(combined, perturbed)]


def _clean_plus_orthogonal(perturbed: Leaves, clean: Leaves, step: SAMStep) -> list[SAMGrad]:
  """``g + alpha h``, ``h`` the part of ``g'`` orthogonal to ``g``; ``g`` at masked leaves.

  As big_vision, with no ``eps``: ``h = g' - <u, g'> u``, ``u = g / ||g||``. At
  ``g = 0`` (where big_vision divides by zero) ``u`` is taken as zero.
  """
  inner, norm_g = step.inner_and_norm(perturbed, clean)
  acc = norm_g.dtype
  safe = jnp.where(norm_g > 0, norm_g, 1)
  along = inner / safe  # <u, g'>
  alpha = step.hyperparam("alpha").astype(acc)

  def one(gp: jax.Array, g: jax.Array) -> jax.Array:
    h = gp.astype(acc) - along * (g.astype(acc) / safe)
    return (g.astype(acc) + h * alpha).astype(g.dtype)

  combined = [one(gp, g) for gp, g in zip(perturbed, clean, strict=True)]
  return [SAMGrad(x) for x in step.where_perturbed(combined, clean)]


def gsam(
  rho: optax.ScalarOrSchedule = 0.05,
  alpha: float | jax.Array = 0.4,
  *,
  minimize: Literal["perturbed", "clean"] = "perturbed",
  relative: bool = False,
  adaptive: bool = False,
  eps: float | jax.Array = 1e-12,
  mask: Mask | None = None,
  skip_nonfinite: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Surrogate Gap Guided Sharpness-Aware Minimization (GSAM).

  As the authors' official code:

  .. math::
    e &= \rho\, g / (\lVert g \rVert + \epsilon), \qquad g' = \nabla L(\theta + e) \\
    \cos &= \langle g, g' \rangle / (\lVert g' \rVert \lVert g \rVert + \epsilon) \\
    v &= g - \cos \lVert g \rVert\, g' / (\lVert g' \rVert + \epsilon)

  and the base optimizer receives ``g' - alpha v``, which descends the surrogate
  gap without changing the perturbed loss to first order. With
  ``minimize="clean"`` (big_vision's ``minimize_fp=False``) it receives
  ``g + alpha h`` instead, with ``h = g' - <u, g'> u`` and ``u = g / ||g||``
  (no ``eps``; ``u = 0`` at ``g = 0``): the clean loss plus the gap.

  Norms and inner products are global over all (unmasked) parameters. In
  adaptive mode the perturbation is that of :func:`fsam`'s adaptive mode
  (the PyTorch SAM code's form); with ``relative=True`` it is big_vision's
  ``adaptive_perturbation``, ``e = rho |theta| g / (||g|| + eps)``. The
  decomposition stays plain. ``alpha = 0`` is SAM. The paper lets ``rho``
  follow the learning rate: build that schedule with :func:`gsam_rho_schedule`.
  With ``perturbation="per_device"`` each replica decomposes its own
  gradients, as the official code under PyTorch DDP.

  Args:
    rho: perturbation radius, ``>= 0``; a scalar or a schedule of the step.
    alpha: weight of the orthogonal component, in ``[0, 1]``.
    minimize: ``"perturbed"`` (the official code, big_vision's default) or
      ``"clean"`` (big_vision's ``minimize_fp=False``).
    relative: perturb each weight in proportion to its magnitude, with the
      plain norm of ``g`` (big_vision's ``adaptive_perturbation``).
    adaptive: the PyTorch SAM code's adaptive perturbation (``|theta|``, no
      ``eta``), as the official GSAM code's ``adaptive``.
    eps: added to the norms before dividing, ``> 0``.
    mask: pytree of bools (or a callable of the params returning one); leaves
      that are ``False`` are not perturbed, are left out of the norms, and
      receive ``g'`` unchanged (``g`` with ``minimize="clean"``).
    skip_nonfinite: leave the state unchanged on a non-finite step (see :func:`fsam`).

  Returns:
    A :class:`optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax.numpy as jnp, optax, fsam_optax
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> tx = optax.chain(fsam_optax.gsam(rho=0.1, alpha=0.4), optax.sgd(0.01))
    >>> grad_fn = fsam_optax.sam_value_and_grad(lambda p: jnp.sum(p["w"] ** 4))
    >>> value, grads = grad_fn(params, tx.init(params))
    >>> print(float(value))
    17.0

  References:
    Zhuang et al., `Surrogate Gap Minimization Improves Sharpness-Aware
    Training <https://arxiv.org/abs/2203.08065>`_, ICLR 2022.
  """
  check("gsam", "alpha", alpha, lambda v: 0 <= v <= 1, "in [0, 1] (0: SAM)")
  if minimize not in ("perturbed", "clean"):
    raise ValueError(
      f'gsam: `minimize` must be "perturbed" (the official code) or "clean" (big_vision\'s '
      f"minimize_fp=False), got {minimize!r}."
    )
  if not isinstance(relative, bool):
    raise ValueError(f"gsam: `relative` must be a Python bool, got {relative!r}.")
  if relative and adaptive:
    raise ValueError(
      "gsam: `relative=True` (big_vision's adaptive_perturbation) and `adaptive=True` (the "
      "official code's) are two different perturbations; choose one."
    )
  return method_transformation(
    GSAMState,
    "gsam",
    rho=rho,
    eps=eps,
    scalars={"alpha": alpha},
    options={"minimize": minimize, "relative": relative},
    adaptive=adaptive,
    mask=mask,
    skip_nonfinite=skip_nonfinite,
  )
