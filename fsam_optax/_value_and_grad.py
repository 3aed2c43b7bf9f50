"""The two-pass gradient that :func:`fsam_optax.fsam` consumes."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fsam_optax._fsam import FSAMState, SAMGrad
from fsam_optax._lookup import find_fsam_state
from fsam_optax._precision import applied_norm, scaled_value_and_grad
from fsam_optax._randomness import SecondPassRng, check_rng_options, second_pass_args

Perturbation = Literal["global", "per_device"]


class SAMDiagnostics(NamedTuple):
  """Per-step quantities that come for free with the two passes.

  Attributes:
    value: loss at the weights ``theta`` (the clean pass).
    perturbed_value: loss at ``theta + e`` (the second pass).
    direction_norm: global norm ``n`` of the direction ``d`` (of ``|theta| d``
      in adaptive mode), before scaling to the radius.
    perturbation_norm: global norm of the perturbation ``e`` (``rho`` for
      the non-adaptive perturbation).
    applied_perturbation_norm: global norm of the perturbation actually
      applied, ``(theta + e) - theta`` with ``theta + e`` rounded to the
      params' dtype. When that dtype cannot resolve ``e`` (bfloat16 weights)
      it differs from ``perturbation_norm``: lower where ``theta + e`` rounds
      back to ``theta``, and possibly higher where a weight jumps a whole
      step of its dtype instead of ``e_i``.
    clean_grad_norm: global norm of the clean gradient ``g`` (averaged over
      ``axis_name``; after ``clip_clean_grad``).
    perturbed_grad_norm: global norm of the perturbed gradient ``g'``.
  """

  value: jax.Array
  perturbed_value: jax.Array
  direction_norm: jax.Array
  perturbation_norm: jax.Array
  applied_perturbation_norm: jax.Array
  clean_grad_norm: jax.Array
  perturbed_grad_norm: jax.Array

  @property
  def sharpness(self) -> jax.Array:
    """Perturbed loss minus clean loss."""
    return self.perturbed_value - self.value


def _scalar(x: Any) -> jax.Array:
  # Unwraps Flax NNX variables (nnx.Optimizer keeps its state in them).
  return jnp.asarray(jax.tree.leaves(x)[0])


def _hyperparam(name: str, state: FSAMState, live: Any) -> jax.Array:
  # Under inject_hyperparams the dict holds the values the user set last; the
  # inner state only learns them at the next update.
  value = getattr(state, name)
  if live is not None and name in live:
    value = jnp.asarray(_scalar(live[name]), dtype=_scalar(value).dtype)
  return _scalar(value)


def _mask_leaves(mask: tuple[bool, ...] | None, n: int) -> list[bool]:
  if mask is None:
    return [True] * n
  if len(mask) != n:
    raise ValueError(
      f"fsam: the state's `mask` covers {len(mask)} parameter leaves but the params "
      f"have {n}; initialise the optimizer with the same params you pass here."
    )
  return list(mask)


def _acc_dtype(leaves: list[jax.Array]) -> jnp.dtype:
  # Norms accumulate in at least float32, in float64 for float64 params.
  return jnp.result_type(jnp.float32, *(x.dtype for x in leaves))


def perturb(params: Any, grads: Any, state: FSAMState, live: Any) -> tuple[Any, jax.Array, list]:
  """Returns ``theta + e``, the direction norm ``n`` and the leaves of ``e``.

  Masked-out leaves get no perturbation, and ``None`` in place of theirs.
  """
  p_leaves, treedef = jax.tree.flatten(params)
  # Python-number leaves (a temperature, say) have no dtype until made arrays.
  p_leaves = [jnp.asarray(p) for p in p_leaves]
  d_leaves = jax.tree.leaves(grads)
  if state.ema is not None:
    ema = jax.tree.leaves(state.ema)
    if len(ema) != len(p_leaves):
      raise ValueError(
        f"sam_value_and_grad: params have {len(p_leaves)} leaves but the "
        f"F-SAM state averages {len(ema)}; initialise the optimizer with "
        "the same params you pass here."
      )
    sigma = _hyperparam("sigma", state, live)
    d_leaves = [(g - sigma * m).astype(g.dtype) for g, m in zip(d_leaves, ema, strict=True)]
  rho = _hyperparam("rho", state, live)
  eps = _hyperparam("eps", state, live)
  adaptive = state.config.adaptive
  chosen = _mask_leaves(state.config.mask, len(p_leaves))

  acc = _acc_dtype(p_leaves)

  def weighted(p: jax.Array, d: jax.Array, power: int) -> jax.Array:
    # |theta|**power * d in `acc`, not in the params' dtype: in float16 the
    # product overflows to inf (and e to NaN) already for |theta|, |d| ~ 300.
    d = d.astype(acc)
    return jnp.abs(p).astype(acc) ** power * d if adaptive else d

  sq = [
    jnp.sum(jnp.square(weighted(p, d, 1)))
    for p, d, keep in zip(p_leaves, d_leaves, chosen, strict=True)
    if keep
  ]
  norm = jnp.sqrt(sum(sq, jnp.zeros([], acc)))
  scale = rho.astype(acc) / (norm + eps.astype(acc))
  e_leaves = [
    (scale * weighted(p, d, 2)).astype(p.dtype) if keep else None
    for p, d, keep in zip(p_leaves, d_leaves, chosen, strict=True)
  ]
  perturbed = [p if e is None else p + e for p, e in zip(p_leaves, e_leaves, strict=True)]
  return treedef.unflatten(perturbed), norm, e_leaves


def _vary(tree: Any, axis_name: Any) -> Any:
  """Marks ``tree`` as varying over ``axis_name`` (a no-op outside shard_map).

  Under ``shard_map``'s type checking (``check_vma=True``, its default),
  autodiff sums the gradient of a replicated input over the axis itself, so a
  device would never see its local gradient and the pmean after it would not
  undo the sum. Differentiating at varying params gives the local gradient
  under ``pmap`` and ``shard_map`` alike.
  """
  axes = axis_name if isinstance(axis_name, tuple) else (axis_name,)

  def one(x: Any) -> Any:
    aval = jax.typeof(x)
    mat = getattr(aval, "mat", None)  # newer JAX; older JAX names the set `vma`
    varying = mat.varying if mat is not None else getattr(aval, "vma", frozenset())
    missing = tuple(a for a in axes if a not in varying)
    if not missing:
      return x
    if hasattr(jax.lax, "pcast"):
      return jax.lax.pcast(x, missing, to="varying")
    return jax.lax.pvary(x, missing)

  return jax.tree.map(one, tree)


def _norm(leaves: list) -> jax.Array:
  leaves = [x for x in leaves if x is not None]
  acc = _acc_dtype(leaves)
  return jnp.sqrt(sum((jnp.sum(jnp.square(x.astype(acc))) for x in leaves), jnp.zeros([], acc)))


def sam_value_and_grad(
  fun: Callable[..., Any],
  *,
  has_aux: bool = False,
  axis_name: str | None = None,
  perturbation: Perturbation = "global",
  return_diagnostics: bool = False,
  rng_arg: int | str | None = None,
  second_pass_rng: SecondPassRng = "fresh",
  clip_clean_grad: float | None = None,
) -> Callable[..., Any]:
  """Clean loss and F-SAM gradients of ``fun``, for :func:`fsam_optax.fsam`.

  The returned function takes ``(params, opt_state, *args, **kwargs)``. It
  finds the F-SAM state in ``opt_state`` (under ``optax.chain``,
  ``named_chain``, ``inject_hyperparams`` or in an ``nnx.Optimizer``),
  takes the gradient ``g`` of ``fun`` at ``params``, builds the perturbation
  ``e`` from ``g`` and the state, and takes the gradient ``g'`` at
  ``params + e``. It returns ``(value, grads)``, or ``((value, aux), grads)``
  with ``has_aux``, where ``value`` and ``aux`` come from the clean pass and
  ``grads`` has the structure of ``params`` with a
  :class:`SAMGrad` ``(perturbed=g', clean=g)`` at each leaf: pass it unchanged
  to ``tx.update`` (or ``TrainState.apply_gradients``, ``nnx.Optimizer.update``).

  Args:
    fun: the loss, ``fun(params, *args, **kwargs)``; a scalar, or
      ``(scalar, aux)`` with ``has_aux=True``.
    has_aux: whether ``fun`` returns auxiliary data. Only the clean pass's
      aux is returned (so batch statistics come from it).
    axis_name: the mapped axis (``pmap`` or ``shard_map``) over which the
      batch is split. Gradients and the value are averaged over it, so every
      device gets the result of the global batch.
    perturbation: ``"global"`` perturbs with the gradient averaged over
      ``axis_name`` (the single-device algorithm on the global batch);
      ``"per_device"`` perturbs each device with its local gradient
      ("m-sharpness") and averages only the perturbed gradients (the moving
      average is still fed the averaged clean gradient, so the state stays
      identical on every device).
    return_diagnostics: also return a :class:`SAMDiagnostics` as a third
      output. Under ``jit`` what is not used is compiled away.
    rng_arg: which argument of ``fun`` is a PRNG key (its position, params
      being 0, or its keyword name), for dropout and other randomness.
    second_pass_rng: with ``rng_arg``, the key of the second pass:
      ``"fresh"`` (the default, as the official code, where each forward pass
      draws its own dropout mask) gives it ``jax.random.fold_in(key, 1)``;
      ``"same"`` gives both passes the same key. Without ``rng_arg`` both
      passes receive the same arguments.
    clip_clean_grad: if set, the clean gradient is clipped to this global
      norm (as ``optax.clip_by_global_norm``) before it forms the direction
      and feeds the moving average.

  The returned function also takes a keyword ``loss_scale`` (consumed, not
  passed to ``fun``) for float16 training: the loss is multiplied by it in
  both passes and the gradients divided by it before they form the direction,
  its norm, and the returned pairs. It may change between steps (a traced
  value); skip steps with non-finite gradients, e.g. with
  ``optax.chain(fsam(...), optax.apply_if_finite(base, k))``.

  Returns:
    A function ``(params, opt_state, *args, loss_scale=None, **kwargs) ->
    (value, grads)``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, fsam_optax
    >>> params = jnp.array([1.0, 2.0])
    >>> loss = lambda p: jnp.sum(p ** 2)
    >>> tx = optax.chain(fsam_optax.sam(rho=0.5), optax.sgd(0.1))
    >>> opt_state = tx.init(params)
    >>> grad_fn = fsam_optax.sam_value_and_grad(loss, return_diagnostics=True)
    >>> value, grads, diag = jax.jit(grad_fn)(params, opt_state)
    >>> print(round(float(diag.perturbation_norm), 4))
    0.5
  """
  if not callable(fun):
    raise TypeError(f"sam_value_and_grad: `fun` must be callable, got {type(fun).__name__}.")
  if perturbation not in ("global", "per_device"):
    raise ValueError(
      f"sam_value_and_grad: `perturbation` must be 'global' or 'per_device', got {perturbation!r}."
    )
  if perturbation == "per_device" and axis_name is None:
    raise ValueError(
      "sam_value_and_grad: perturbation='per_device' needs `axis_name`, the "
      "pmap or shard_map axis that splits the batch."
    )
  check_rng_options(rng_arg, second_pass_rng)
  if clip_clean_grad is not None and not clip_clean_grad > 0:
    raise ValueError(
      f"sam_value_and_grad: `clip_clean_grad` must be a norm > 0, got {clip_clean_grad!r}."
    )
  value_and_grad = scaled_value_and_grad(fun, has_aux)
  mean = functools.partial(jax.lax.pmean, axis_name=axis_name) if axis_name else (lambda x: x)
  clip = lambda tree: tree
  if clip_clean_grad is not None:
    clipper = optax.clip_by_global_norm(clip_clean_grad)
    clip = lambda tree: clipper.update(tree, clipper.init(tree))[0]

  def grad_fn(
    params: Any, opt_state: Any, *args: Any, loss_scale: Any = None, **kwargs: Any
  ) -> Any:
    found = find_fsam_state(opt_state)
    state = found.state
    if axis_name is not None:
      params = _vary(params, axis_name)
    out, local_grads = value_and_grad(loss_scale, params, *args, **kwargs)
    # The averaged clean gradient perturbs in global mode and feeds the moving
    # average; per-device SAM needs neither, so it skips that all-reduce.
    grads = None
    if perturbation == "global" or state.ema is not None:
      grads = clip(mean(local_grads))
    direction = grads if perturbation == "global" else clip(local_grads)
    perturbed_params, norm, e_leaves = perturb(params, direction, state, found.hyperparams)
    args_p, kwargs_p = second_pass_args(args, kwargs, rng_arg, second_pass_rng)
    out_p, perturbed_grads = value_and_grad(loss_scale, perturbed_params, *args_p, **kwargs_p)
    perturbed_grads = mean(perturbed_grads)
    if state.ema is None:
      sam_grads = jax.tree.map(lambda gp: SAMGrad(gp, None), perturbed_grads)
    else:
      sam_grads = jax.tree.map(SAMGrad, perturbed_grads, grads)
    value = mean(out[0] if has_aux else out)
    result = ((value, out[1]) if has_aux else value), sam_grads
    if not return_diagnostics:
      return result
    perturbed_value = mean(out_p[0] if has_aux else out_p)
    clean = grads if grads is not None else clip(mean(local_grads))
    return (
      *result,
      SAMDiagnostics(
        value,
        perturbed_value,
        norm,
        _norm(e_leaves),
        applied_norm(params, perturbed_params),
        _norm(jax.tree.leaves(clean)),
        _norm(jax.tree.leaves(perturbed_grads)),
      ),
    )

  return grad_fn
