"""LookSAM as an Optax transformation: SAM every ``k`` steps, its correction reused between.

On a SAM step the state keeps ``g_v``, the part of the perturbed gradient
``g'`` orthogonal to the clean gradient ``g``; on the steps between, which
cost one forward-backward pass, the base optimizer receives ``g`` plus that
component rescaled to ``g``'s norm (:meth:`LookSAMState.pairs`).
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fsam_optax._buffers import zeros_buffer
from fsam_optax._config import PerturbationConfig
from fsam_optax._hyperparams import at, check, default_float
from fsam_optax._layout import Layout
from fsam_optax._mask import Mask, mask_leaves, resolve_mask
from fsam_optax._method import Step, method_name, sam_state
from fsam_optax._pairs import SAMGrad
from fsam_optax._perturbation import Direction
from fsam_optax._transformation import advancing_update, check_arguments


@sam_state
class LookSAMState(NamedTuple):
  """State of :func:`looksam`.

  Attributes:
    count: number of updates applied so far (int32).
    rho: perturbation radius for the next SAM step (a schedule is evaluated here).
    alpha: weight of the reused component on the steps between SAM steps.
    eps: added to the norms before dividing by them.
    g_v: the component of the last SAM step's ``g'`` orthogonal to its ``g``
      (float32 for narrower params).
    config: static settings (mask, and ``every``: the SAM steps).
  """

  count: jax.Array  # type: ignore[assignment]
  rho: jax.Array
  alpha: jax.Array
  eps: jax.Array
  g_v: optax.Updates
  config: PerturbationConfig

  def direction(self, grads: list[jax.Array], step: Step) -> Direction:
    """``g`` itself, as SAM."""
    del step
    return Direction(grads, grads)

  def pairs(self, perturbed: Any, clean: Any, step: Step) -> Any:
    """``SAMGrad(g', None, g_v)`` on a SAM step; between, the reused gradient, old ``g_v``."""
    first, treedef = jax.tree.flatten(perturbed)
    g = jax.tree.leaves(clean)
    g_v = jax.tree.leaves(self.g_v)
    if len(g_v) != len(g):
      raise ValueError(
        f"sam_value_and_grad: params have {len(g)} leaves but the `g_v` of the "
        f"{method_name(self)} state covers {len(g_v)}; initialise the optimizer with the "
        "same params you pass here."
      )
    mask = mask_leaves(self.config.mask, len(g), method_name(self))
    eps, layout = step.hyperparam("eps"), step.layout
    if step.sam_step:
      scale = projection(first, g, eps, mask, layout)
      base, kept = first, orthogonal_part(first, g, g_v, scale, mask)
    else:
      scale = reuse_scale(g, g_v, step.hyperparam("alpha"), eps, mask, layout)
      base, kept = reuse(g, g_v, scale, mask), g_v
    pairs = [SAMGrad(b, None, v) for b, v in zip(base, kept, strict=True)]
    return jax.tree.unflatten(treedef, pairs)


def _kept(leaves: list[Any], mask: list[bool]) -> list[Any]:
  return [x if k else None for x, k in zip(leaves, mask, strict=True)]


def projection(
  g_prime: list[jax.Array], g: list[jax.Array], eps: jax.Array, mask: list[bool], layout: Layout
) -> jax.Array:
  """``<g, g'> / (||g||^2 + eps)``, the coefficient of ``g`` in ``g'``."""
  norm_g = layout.norm(_kept(g, mask))
  return layout.inner(_kept(g, mask), _kept(g_prime, mask)) / (norm_g**2 + eps.astype(norm_g.dtype))


def orthogonal_part(
  g_prime: list[jax.Array],
  g: list[jax.Array],
  g_v: list[jax.Array],
  scale: jax.Array,
  mask: list[bool],
) -> list[jax.Array]:
  """``g_v = g' - scale g`` in ``g_v``'s dtypes (``scale``: ``projection``); masked: ``g_v``."""

  def one(gp: jax.Array, gc: jax.Array, old: jax.Array) -> jax.Array:
    acc = scale.dtype
    return (gp.astype(acc) - scale * gc.astype(acc)).astype(old.dtype)

  return [
    one(gp, gc, old) if k else old for gp, gc, old, k in zip(g_prime, g, g_v, mask, strict=True)
  ]


def reuse_scale(
  g: list[jax.Array],
  g_v: list[jax.Array],
  alpha: jax.Array,
  eps: jax.Array,
  mask: list[bool],
  layout: Layout,
) -> jax.Array:
  """``alpha ||g|| / (||g_v|| + eps)``, the weight of ``g_v`` in the reused gradient."""
  norm_g, norm_v = layout.norm(_kept(g, mask)), layout.norm(_kept(g_v, mask))
  acc = jnp.promote_types(norm_g.dtype, norm_v.dtype)
  return alpha.astype(acc) * (norm_g.astype(acc) / (norm_v.astype(acc) + eps.astype(acc)))


def reuse(
  g: list[jax.Array], g_v: list[jax.Array], scale: jax.Array, mask: list[bool]
) -> list[jax.Array]:
  """``g + scale g_v`` in ``g``'s dtypes (``scale``: ``reuse_scale``); masked leaves get ``g``."""

  def one(gc: jax.Array, v: jax.Array) -> jax.Array:
    acc = scale.dtype
    return (gc.astype(acc) + scale * v.astype(acc)).astype(gc.dtype)

  return [one(gc, v) if k else gc for gc, v, k in zip(g, g_v, mask, strict=True)]


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

  As the paper's Algorithm 1, with whole-model vectors. On steps
  ``0, every, 2 every, ...`` it takes SAM's step and keeps the part of the
  perturbed gradient orthogonal to the clean one:

  .. math::
    g' &= \nabla L(\theta + \rho\, g / (\lVert g \rVert + \epsilon)) \\
    g_v &= g' - \frac{\langle g, g' \rangle}{\lVert g \rVert^2 + \epsilon}\, g

  and the optimizers after ``looksam`` receive ``g'``. On the other steps
  :func:`fsam_optax.sam_value_and_grad` makes one forward-backward pass and
  they receive ``g + alpha (\lVert g \rVert / (\lVert g_v \rVert + \epsilon))
  g_v``. ``every = 1`` is SAM; ``alpha = 0`` is SAM every ``every`` steps
  with plain gradients between. The weights are always the current ones (a
  one-pass step never goes back to the weights of the last SAM step).

  ``looksam`` must be first in the chain and be fed by
  :func:`fsam_optax.sam_value_and_grad`. With ``perturbation="per_device"``
  each data replica computes ``g_v`` and the reused gradient from its own
  gradients, and both are averaged.

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
    g_v_dtype: dtype of the kept component. By default float32 for params
      narrower than float32, and the param's dtype otherwise.
    skip_nonfinite: leave the state unchanged on a step whose gradients are
      not all finite (see :func:`fsam`).

  Returns:
    A :class:`optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax.numpy as jnp, optax, fsam_optax
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> loss = lambda p: jnp.sum(p["w"] ** 4)
    >>> tx = optax.chain(fsam_optax.looksam(rho=0.1, every=5), optax.sgd(0.01))
    >>> opt_state = tx.init(params)
    >>> grad_fn = fsam_optax.sam_value_and_grad(loss, return_diagnostics=True)
    >>> steps = []
    >>> for _ in range(6):
    ...   value, grads, diag = grad_fn(params, opt_state)
    ...   updates, opt_state = tx.update(grads, opt_state, params)
    ...   params = optax.apply_updates(params, updates)
    ...   steps.append(bool(diag.perturbation_norm > 0))
    >>> steps
    [True, False, False, False, False, True]

  References:
    Liu et al., `Towards Efficient and Scalable Sharpness-Aware Minimization
    <https://arxiv.org/abs/2203.02714>`_, CVPR 2022.
  """
  check_arguments("looksam", rho, eps, mask)
  if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
    raise ValueError(
      f"looksam: `every` must be an integer >= 1 (1: SAM on every step), got {every!r}; "
      "it is static: under optax.inject_hyperparams pass static_args=('every',)."
    )
  check("looksam", "alpha", alpha, lambda v: v >= 0, ">= 0 (0: plain gradients between SAM steps)")
  if g_v_dtype is not None:
    g_v_dtype = jnp.dtype(g_v_dtype)

  def init_fn(params: optax.Params) -> LookSAMState:
    config = PerturbationConfig(
      mask=resolve_mask(mask, params, "looksam"),
      skip_nonfinite=bool(skip_nonfinite),
      every=int(every),
      method="looksam",
    )
    return LookSAMState(
      count=jnp.zeros([], jnp.int32),
      rho=at(rho, jnp.zeros([], jnp.int32)),
      alpha=default_float(alpha),
      eps=default_float(eps),
      g_v=zeros_buffer(params, g_v_dtype),
      config=config,
    )

  scalars = {"alpha": alpha, "eps": eps}
  update_fn = advancing_update("looksam", rho, scalars, skip_nonfinite, carried="g_v")
  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
