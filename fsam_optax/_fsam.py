"""Friendly Sharpness-Aware Minimization (F-SAM) as an Optax transformation.

The state holds the moving average ``m`` of clean gradients; it tells the
gradient helper the direction to perturb along (:meth:`FSAMState.direction`),
and the update feeds it the clean gradient of the step.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fsam_optax._buffers import zeros_buffer
from fsam_optax._config import PerturbationConfig
from fsam_optax._hyperparams import at, check, default_float
from fsam_optax._mask import Mask, check_mask_leaves, resolve_mask
from fsam_optax._method import Step, method_name, sam_state
from fsam_optax._pairs import SAMGrad, split_grads
from fsam_optax._perturbation import Direction
from fsam_optax._schedule import check_schedule


@sam_state
class FSAMState(NamedTuple):
  """State of :func:`fsam`.

  Attributes:
    count: number of updates applied so far (int32).
    rho: perturbation radius for the next step (a schedule is evaluated here).
    sigma: weight of the moving average removed from the gradient.
    eps: added to the direction's norm before dividing by it.
    ema: moving average ``m`` of clean gradients, or ``None`` for plain SAM.
    config: static settings (adaptive mode, mask, which steps take the SAM step).
  """

  # Optax states name their step count `count`, which shadows tuple.count.
  count: jax.Array  # type: ignore[assignment]
  rho: jax.Array
  sigma: jax.Array
  eps: jax.Array
  ema: optax.Updates | None
  config: PerturbationConfig

  def pairs(self, perturbed: Any, clean: Any, step: Step) -> Any:
    """The ``SAMGrad`` tree that the update consumes: ``(g', g)``, or ``(g', None)`` for SAM."""
    del step  # F-SAM hands both gradients on as they are.
    if self.ema is not None:
      return jax.tree.map(SAMGrad, perturbed, clean)
    return jax.tree.map(lambda g: SAMGrad(g, None), perturbed)

  def direction(self, grads: list[jax.Array], step: Step) -> Direction:
    """``d = g - sigma m`` (``g`` for plain SAM), leaf by leaf, in the gradients' dtypes."""
    if self.ema is None:
      return Direction(grads, grads)
    ema = jax.tree.leaves(self.ema)
    if len(ema) != len(grads):
      raise ValueError(
        f"sam_value_and_grad: params have {len(grads)} leaves but the moving average of "
        f"the {method_name(self)} state covers {len(ema)}; initialise the optimizer with "
        "the same params you pass here."
      )
    sigma = step.hyperparam("sigma")
    pairs = list(zip(grads, ema, strict=True))
    # g + (-sigma) m is g - sigma m bit for bit; spelled apart, it is not stored
    # once for both readers but computed inside each (see Direction).
    return Direction(
      [(g - sigma * m).astype(g.dtype) for g, m in pairs],
      [(g + (-sigma) * m).astype(g.dtype) for g, m in pairs],
    )


def moving_average(ema: Any, grads: list[jax.Array], lmbda: Any, count: jax.Array) -> Any:
  """``m = lmbda m + (1 - lmbda) g`` leaf by leaf, and ``m = g`` on the first step (count 0).

  The first step's rule is the official code's initialisation, by decay 0.
  """
  decay = jnp.where(count == 0, 0.0, lmbda)
  leaves, treedef = jax.tree.flatten(ema)

  def one(m: jax.Array, g: jax.Array) -> jax.Array:
    # 1 - decay in at least the average's precision: a float32 lmbda (as
    # inject_hyperparams stores it) would otherwise round it for float64.
    a = decay.astype(jnp.promote_types(m.dtype, jnp.float32))
    return (a * m + (1 - a) * g).astype(m.dtype)

  return jax.tree.unflatten(treedef, [one(m, g) for m, g in zip(leaves, grads, strict=True)])


def advance_if_finite(
  skip_nonfinite: bool, advance: Callable[[], Any], state: Any, grads: Sequence[jax.Array | None]
) -> Any:
  """``advance()``, or with ``skip_nonfinite`` ``state`` unchanged where a gradient is not finite.

  A non-finite step must not reach the moving average (it would never leave it).
  """
  if not skip_nonfinite:
    return advance()
  kept = [g for g in grads if g is not None]
  finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(g)) for g in kept] or [True]))
  # lax.cond, not a select per leaf: the selects make XLA's compile time
  # grow steeply with the number of leaves.
  return jax.lax.cond(finite, advance, lambda: state)


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

  SAM takes the gradient at weights moved a distance ``rho`` uphill along the
  minibatch gradient ``g``. F-SAM moves only along the batch-specific noise:
  it removes ``sigma`` times a moving average ``m`` of past gradients (an
  estimate of the full gradient) from ``g``. Step for step as the authors'
  official code:

  .. math::
    d_t &= g_t - \sigma m_{t-1}, \qquad d_1 = g_1 \\
    m_t &= \lambda m_{t-1} + (1 - \lambda) g_t, \qquad m_1 = g_1 \\
    e_t &= \rho\, d_t / (\lVert d_t \rVert + \epsilon)

  and the optimizers after ``fsam`` receive ``g'_t``, the gradient at
  ``theta + e_t``. The norm is global over all (unmasked) parameters. In
  adaptive mode (ASAM) the norm is that of ``|theta| d`` and
  ``e = rho theta^2 d / (norm + eps)``. ``sigma = 0`` is SAM.

  ``fsam`` must be first in the chain and be fed by
  :func:`fsam_optax.sam_value_and_grad`, which computes ``g``, ``e`` and
  ``g'`` from this state; ``fsam`` itself keeps the moving average.

  Args:
    rho: perturbation radius, ``>= 0``; a scalar or a schedule of the step.
    sigma: how much of the moving average to remove, ``>= 0``. A Python ``0``
      keeps no moving average (plain SAM).
    lmbda: decay of the moving average, in ``[0, 1)``.
    adaptive: ASAM-style scale-invariant perturbation.
    eps: added to the norm before dividing, ``> 0``.
    mask: pytree of bools (or a callable of the params returning one); leaves
      that are ``False`` are not perturbed and are left out of the norm. It
      is resolved once, at ``init``, into one bool per parameter leaf.
    every: take the F-SAM step on steps ``0, every, 2 every, ...`` only; the
      other steps cost one forward-backward pass and hand the clean gradient
      to the base optimizer (the moving average is fed it on every step).
      Under ``vmap`` of the optimizer state the choice becomes a select that
      runs both branches, and nothing is saved.
    probability: take the F-SAM step with this probability, in ``(0, 1]``,
      drawn from ``seed`` and the step count (the same on every device).
      Give ``every`` or ``probability``, not both.
    seed: seed of the ``probability`` draws (default 0). ``every``,
      ``probability`` and ``seed`` are static: under
      ``optax.inject_hyperparams`` name them in ``static_args``, with
      ``mask`` and ``ema_dtype`` (which it would otherwise take for schedules).
    ema_dtype: dtype of the moving average. By default float32 for params
      narrower than float32 (bfloat16, float16), whose rounding would swallow
      the ``(1 - lmbda) g`` increments, and the param's dtype otherwise.
    skip_nonfinite: leave the state (moving average, count, schedule)
      unchanged on a step whose clean or perturbed gradients are not all
      finite, so that ``optax.chain(fsam(..., skip_nonfinite=True),
      optax.apply_if_finite(base, k))`` skips such a step entirely (needed
      with float16 loss scaling). It costs one pass over the gradients.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, fsam_optax
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> loss = lambda p, x: jnp.sum((p["w"] * x) ** 2)
    >>> tx = optax.chain(fsam_optax.fsam(rho=0.2, sigma=1.0, lmbda=0.6),
    ...                  optax.sgd(0.05, momentum=0.9))
    >>> opt_state = tx.init(params)
    >>> grad_fn = fsam_optax.sam_value_and_grad(loss)
    >>> value, grads = grad_fn(params, opt_state, jnp.array([1.0, 0.5]))
    >>> updates, opt_state = tx.update(grads, opt_state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> print(float(value))
    2.0

  References:
    Li et al., `Friendly Sharpness-Aware Minimization
    <https://arxiv.org/abs/2403.12350>`_, CVPR 2024.
  """
  return _fsam_or_sam(
    "fsam",
    rho,
    sigma,
    lmbda,
    adaptive=adaptive,
    eps=eps,
    mask=mask,
    every=every,
    probability=probability,
    seed=seed,
    ema_dtype=ema_dtype,
    skip_nonfinite=skip_nonfinite,
  )


def _fsam_or_sam(
  method: str,
  rho: optax.ScalarOrSchedule,
  sigma: float | jax.Array,
  lmbda: float | jax.Array,
  *,
  adaptive: bool,
  eps: float | jax.Array,
  mask: Mask | None,
  every: int | None,
  probability: float | None,
  seed: int | None,
  ema_dtype: Any | None,
  skip_nonfinite: bool,
) -> optax.GradientTransformationExtraArgs:
  """:func:`fsam` (or :func:`sam`, as ``method``, which names it in errors and in the state)."""
  check(method, "rho", rho, lambda v: v >= 0, "a radius >= 0")
  check(method, "sigma", sigma, lambda v: v >= 0, ">= 0")
  check(method, "lmbda", lmbda, lambda v: 0 <= v < 1, "in [0, 1)")
  check(method, "eps", eps, lambda v: v > 0, "> 0")
  every, probability, seed = check_schedule(every, probability, seed, method)
  if mask is not None and not callable(mask):
    check_mask_leaves(jax.tree.leaves(mask), method)
  if ema_dtype is not None:
    ema_dtype = jnp.dtype(ema_dtype)
  # Only a concrete Python zero drops the buffer: a traced sigma (for example
  # under inject_hyperparams) keeps it, so init and update agree on structure.
  keep_ema = not (isinstance(sigma, numbers.Real) and sigma == 0)

  def init_fn(params: optax.Params) -> FSAMState:
    config = PerturbationConfig(
      adaptive=bool(adaptive),
      mask=resolve_mask(mask, params, method),
      skip_nonfinite=bool(skip_nonfinite),
      every=every,
      probability=probability,
      seed=seed,
      method=method,
    )
    return FSAMState(
      count=jnp.zeros([], jnp.int32),
      rho=at(rho, jnp.zeros([], jnp.int32)),
      sigma=default_float(sigma),
      eps=default_float(eps),
      ema=zeros_buffer(params, ema_dtype) if keep_ema else None,
      config=config,
    )

  def update_fn(
    updates: optax.Updates,
    state: FSAMState,
    params: optax.Params | None = None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, FSAMState]:
    del params, extra_args
    perturbed, clean, _, treedef = split_grads(updates, method)
    ema = state.ema
    if ema is not None:
      if any(c is None for c in clean):
        raise ValueError(
          f"{method}: these gradients carry no clean gradient for its moving average; "
          "they were made from a state that keeps none. Pass the same opt_state to "
          "sam_value_and_grad and to tx.update."
        )
      if len(jax.tree.leaves(ema)) != len(clean):
        raise ValueError(
          f"{method}: the gradients have {len(clean)} leaves but the state's "
          f"moving average has {len(jax.tree.leaves(ema))}; initialise the optimizer "
          "with the params you differentiate."
        )

    def advance() -> FSAMState:
      count = optax.safe_increment(state.count)
      return state._replace(
        count=count,
        rho=at(rho, count),
        sigma=default_float(sigma),
        eps=default_float(eps),
        ema=None if ema is None else moving_average(ema, clean, lmbda, state.count),
      )

    new_state = advance_if_finite(skip_nonfinite, advance, state, [*perturbed, *clean])
    return jax.tree.unflatten(treedef, perturbed), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def sam(
  rho: optax.ScalarOrSchedule = 0.05,
  *,
  adaptive: bool = False,
  eps: float | jax.Array = 1e-12,
  mask: Mask | None = None,
  every: int | None = None,
  probability: float | None = None,
  seed: int | None = None,
  skip_nonfinite: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Sharpness-Aware Minimization: :func:`fsam` with ``sigma = 0``.

  Keeps no moving average; with ``adaptive=True`` it is ASAM.

  Args:
    rho: perturbation radius, ``>= 0``; a scalar or a schedule of the step.
    adaptive: ASAM-style scale-invariant perturbation.
    eps: added to the norm before dividing, ``> 0``.
    mask: pytree of bools (or a callable of the params returning one); leaves
      that are ``False`` are not perturbed.
    every: take the SAM step every ``every`` steps only (see :func:`fsam`).
    probability: take the SAM step with this probability (see :func:`fsam`).
    seed: seed of the ``probability`` draws.
    skip_nonfinite: leave the state unchanged on a non-finite step (see
      :func:`fsam`).

  Returns:
    A :class:`optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax.numpy as jnp, optax, fsam_optax
    >>> tx = optax.chain(fsam_optax.sam(rho=0.05), optax.sgd(0.1))
    >>> tx.init({"w": jnp.zeros(3)})[0].ema is None
    True

  References:
    Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
    Generalization <https://arxiv.org/abs/2010.01412>`_, ICLR 2021.
  """
  return _fsam_or_sam(
    "sam",
    rho,
    0.0,
    0.9,
    adaptive=adaptive,
    eps=eps,
    mask=mask,
    every=every,
    probability=probability,
    seed=seed,
    ema_dtype=None,
    skip_nonfinite=skip_nonfinite,
  )
