"""Friendly Sharpness-Aware Minimization (F-SAM) as an Optax transformation."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, NamedTuple, NoReturn

import jax
import jax.numpy as jnp
import optax

from fsam_optax._config import PerturbationConfig
from fsam_optax._schedule import check_schedule

Mask = Any  # A pytree of bools (a prefix of the params), or a callable giving one.


class SAMGrad(NamedTuple):
  """The gradient pair that :func:`sam_value_and_grad` returns for one leaf.

  Attributes:
    perturbed: gradient of the loss at the perturbed weights ``theta + e``; it
      is what the optimizers after :func:`fsam` in the chain receive.
    clean: gradient at ``theta``, fed into the F-SAM moving average; ``None``
      when the state keeps no average (plain SAM).
  """

  perturbed: jax.Array
  clean: jax.Array | None

  # Arithmetic on a pair would silently stack the two gradients into one
  # array (jnp treats a tuple as a sequence), or repeat or concatenate the
  # tuple: refuse it with what to do.
  def __jax_array__(self, *args: Any, **kwargs: Any) -> NoReturn:
    raise TypeError(_PAIR_AS_ARRAY)

  def __array__(self, *args: Any, **kwargs: Any) -> NoReturn:
    raise TypeError(_PAIR_AS_ARRAY)

  def __add__(self, other: Any) -> NoReturn:
    raise TypeError(_PAIR_AS_ARRAY)

  def __radd__(self, other: Any) -> NoReturn:
    raise TypeError(_PAIR_AS_ARRAY)

  def __mul__(self, other: Any) -> NoReturn:
    raise TypeError(_PAIR_AS_ARRAY)

  def __rmul__(self, other: Any) -> NoReturn:
    raise TypeError(_PAIR_AS_ARRAY)


_PAIR_AS_ARRAY = (
  "a fsam_optax.SAMGrad (perturbed, clean) pair was used as an array. Pass the "
  "helper's gradients unchanged to an optimizer whose chain starts with fsam, or "
  "take the plain trees with fsam_optax.perturbed_grads(grads) / "
  "fsam_optax.clean_grads(grads)."
)


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


def _concrete(value: Any) -> float | None:
  """Returns ``value`` as a float when it is known now, else ``None``."""
  if callable(value) or isinstance(value, jax.core.Tracer):
    return None
  if jnp.ndim(value) != 0:
    raise ValueError(f"expected a scalar hyperparameter, got shape {jnp.shape(value)}")
  return float(value)


def _check(name: str, value: Any, ok: Callable[[float], bool], allowed: str) -> None:
  if callable(value) and name != "rho":
    raise ValueError(
      f"fsam: `{name}` must be a number or a scalar array; only `rho` takes a schedule "
      f"(use optax.inject_hyperparams to change `{name}` during training)."
    )
  v = _concrete(value)
  if v is not None and not ok(v):
    raise ValueError(f"fsam: `{name}` must be {allowed}, got {v!r}.")


def _check_mask_leaves(leaves: list[Any]) -> None:
  for leaf in leaves:
    if isinstance(leaf, jax.core.Tracer) or jnp.ndim(leaf) != 0:
      raise ValueError(
        "fsam: `mask` leaves must be concrete Python bools, one per parameter "
        f"leaf (or per subtree), got {leaf!r}; mask whole arrays, not elements."
      )


def resolve_mask(mask: Mask | None, params: Any) -> tuple[bool, ...] | None:
  """One Python bool per leaf of ``params`` (a callable mask is called on them)."""
  if mask is None:
    return None
  tree = mask(params) if callable(mask) else mask
  leaves = jax.tree.leaves(broadcast_mask(tree, params))
  _check_mask_leaves(leaves)
  return tuple(bool(leaf) for leaf in leaves)


def broadcast_mask(mask_tree: Any, params: Any) -> Any:
  """``mask_tree`` broadcast to the structure of ``params``, or a ValueError."""
  try:
    return jax.tree.broadcast(mask_tree, params)
  except (ValueError, TypeError) as err:
    raise ValueError(
      f"fsam: `mask` must have the structure of the params (or a prefix of it): {err}"
    ) from None


def _default_float(x: Any) -> jax.Array:
  # float64 when x64 is on, float32 otherwise; never weakly typed, so that the
  # state keeps one dtype through init, update, scan and cond.
  return jnp.asarray(x, dtype=jnp.result_type(float))


def _at(value: optax.ScalarOrSchedule, count: jax.Array) -> jax.Array:
  if not callable(value):
    return _default_float(value)
  # An int32 count would make optax's schedules compute in float32 even when
  # x64 is on; the default integer keeps the run's precision.
  return _default_float(value(count.astype(jnp.result_type(int))))


def _zeros_for(param: Any, ema_dtype: jnp.dtype | None) -> jax.Array:
  """The moving average's buffer for one parameter leaf."""
  param = jnp.asarray(param)
  dtype = ema_dtype or param.dtype
  if ema_dtype is None and jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32:
    dtype = jnp.dtype(jnp.float32)
  return jnp.zeros(param.shape, dtype)


def _all_finite(leaves: list[jax.Array]) -> jax.Array:
  return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in leaves] or [True]))


def flatten_pairs(grads: Any, error: str) -> tuple[list[SAMGrad], Any]:
  """The ``SAMGrad`` pairs of the helper's gradients and their treedef.

  Raises ``ValueError(error)`` unless every leaf is a pair.
  """
  is_pair = lambda x: isinstance(x, SAMGrad)
  pairs, treedef = jax.tree.flatten(grads, is_leaf=is_pair)
  if not all(is_pair(p) for p in pairs):
    raise ValueError(error)
  return pairs, treedef


_PLAIN_GRADS = (
  "fsam received plain gradients. Compute them with "
  "`fsam_optax.sam_value_and_grad(loss_fn)(params, opt_state, ...)`, "
  "which returns the perturbed and clean gradients that fsam consumes, "
  "and place fsam first in the chain."
)


def split_grads(updates: optax.Updates) -> tuple[list[jax.Array], list[Any], Any]:
  """Splits helper gradients into perturbed and clean leaves, and a treedef."""
  pairs, treedef = flatten_pairs(updates, _PLAIN_GRADS)
  return [p.perturbed for p in pairs], [p.clean for p in pairs], treedef


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
  _check("rho", rho, lambda v: v >= 0, "a radius >= 0")
  _check("sigma", sigma, lambda v: v >= 0, ">= 0")
  _check("lmbda", lmbda, lambda v: 0 <= v < 1, "in [0, 1)")
  _check("eps", eps, lambda v: v > 0, "> 0")
  every, probability, seed = check_schedule(every, probability, seed)
  if mask is not None and not callable(mask):
    _check_mask_leaves(jax.tree.leaves(mask))
  if ema_dtype is not None:
    ema_dtype = jnp.dtype(ema_dtype)
  # Only a concrete Python zero drops the buffer: a traced sigma (for example
  # under inject_hyperparams) keeps it, so init and update agree on structure.
  keep_ema = not (isinstance(sigma, numbers.Real) and sigma == 0)

  def init_fn(params: optax.Params) -> FSAMState:
    config = PerturbationConfig(
      adaptive=bool(adaptive),
      mask=resolve_mask(mask, params),
      skip_nonfinite=bool(skip_nonfinite),
      every=every,
      probability=probability,
      seed=seed,
    )
    return FSAMState(
      count=jnp.zeros([], jnp.int32),
      rho=_at(rho, jnp.zeros([], jnp.int32)),
      sigma=_default_float(sigma),
      eps=_default_float(eps),
      ema=jax.tree.map(lambda p: _zeros_for(p, ema_dtype), params) if keep_ema else None,
      config=config,
    )

  def update_fn(
    updates: optax.Updates,
    state: FSAMState,
    params: optax.Params | None = None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, FSAMState]:
    del params, extra_args
    perturbed, clean, treedef = split_grads(updates)
    ema = state.ema
    if ema is not None:
      if any(c is None for c in clean):
        raise ValueError(
          "fsam: these gradients carry no clean gradient; they were made "
          "for a state without a moving average. Pass the same opt_state to "
          "sam_value_and_grad and to tx.update."
        )
      ema_leaves, ema_def = jax.tree.flatten(ema)
      if len(ema_leaves) != len(clean):
        raise ValueError(
          f"fsam: the gradients have {len(clean)} leaves but the state's "
          f"moving average has {len(ema_leaves)}; initialise the optimizer "
          "with the params you differentiate."
        )

    def advance() -> FSAMState:
      new_ema = None
      if ema is not None:
        # First step: m = g (the official code's initialisation), by decay 0.
        decay = jnp.where(state.count == 0, 0.0, lmbda)

        def average(m: jax.Array, g: jax.Array) -> jax.Array:
          # 1 - decay in at least the average's precision: a float32 lmbda (as
          # inject_hyperparams stores it) would otherwise round it for float64.
          a = decay.astype(jnp.promote_types(m.dtype, jnp.float32))
          return (a * m + (1 - a) * g).astype(m.dtype)

        new_ema = jax.tree.unflatten(
          ema_def, [average(m, g) for m, g in zip(ema_leaves, clean, strict=True)]
        )
      count = optax.safe_increment(state.count)
      return state._replace(
        count=count,
        rho=_at(rho, count),
        sigma=_default_float(sigma),
        eps=_default_float(eps),
        ema=new_ema,
      )

    if not skip_nonfinite:
      return jax.tree.unflatten(treedef, perturbed), advance()
    # A non-finite step must not reach the average (it would never leave it).
    # lax.cond, not a select per leaf: the selects make XLA's compile time
    # grow steeply with the number of leaves.
    finite = _all_finite([*perturbed, *(c for c in clean if c is not None)])
    new_state = jax.lax.cond(finite, advance, lambda: state)
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
  return fsam(
    rho,
    sigma=0.0,
    adaptive=adaptive,
    eps=eps,
    mask=mask,
    every=every,
    probability=probability,
    seed=seed,
    skip_nonfinite=skip_nonfinite,
  )
