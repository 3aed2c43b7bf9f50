"""The two-pass gradient that :func:`fsam_optax.fsam` consumes."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

from fsam_optax._fsam import FSAMState, SAMGrad, broadcast_mask
from fsam_optax._lookup import find_fsam_state
from fsam_optax._schedule import is_sam_step

Perturbation = Literal["global", "per_device"]


class SAMDiagnostics(NamedTuple):
  """Per-step quantities that come for free with the two passes.

  Attributes:
    value: loss at the weights ``theta`` (the clean pass).
    perturbed_value: loss at ``theta + e`` (the second pass); on a step
      that a schedule (``every``, ``probability``) skips, the clean loss.
    direction_norm: global norm ``n`` of the direction ``d`` (of ``|theta| d``
      in adaptive mode), before scaling to the radius; 0 on a skipped step.
    perturbation_norm: global norm of the perturbation ``e``; 0 on a skipped
      step.
  """

  value: jax.Array
  perturbed_value: jax.Array
  direction_norm: jax.Array
  perturbation_norm: jax.Array

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


def _mask_leaves(mask: Any, params: Any, n: int) -> list[bool]:
  if mask is None:
    return [True] * n
  tree = mask(params) if callable(mask) else mask.tree()
  # A callable's result is checked here, at every call, not once at init.
  leaves = jax.tree.leaves(broadcast_mask(tree, params))
  if len(leaves) != n:
    raise ValueError(f"fsam: `mask` gives {len(leaves)} leaves for {n} parameters.")
  return [bool(leaf) for leaf in leaves]


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
  g_leaves = jax.tree.leaves(grads)
  # d for the norm, and d for the step: the same values, see below.
  d_leaves = e_dirs = g_leaves
  if state.ema is not None:
    ema = jax.tree.leaves(state.ema)
    if len(ema) != len(p_leaves):
      raise ValueError(
        f"sam_value_and_grad: params have {len(p_leaves)} leaves but the "
        f"F-SAM state averages {len(ema)}; initialise the optimizer with "
        "the same params you pass here."
      )
    sigma = _hyperparam("sigma", state, live)
    # d = g - sigma m is read twice, by the norm and by theta + e. Spelled
    # once, XLA would compute it once and write it to memory for both
    # readers; spelled g + (-sigma) m the second time (bit for bit the same
    # value in IEEE arithmetic) it is fused into each reader and never
    # stored: one write and two reads of a parameter-size buffer fewer.
    d_leaves = [(g - sigma * m).astype(g.dtype) for g, m in zip(g_leaves, ema, strict=True)]
    e_dirs = [(g + (-sigma) * m).astype(g.dtype) for g, m in zip(g_leaves, ema, strict=True)]
  rho = _hyperparam("rho", state, live)
  eps = _hyperparam("eps", state, live)
  adaptive = state.config.adaptive
  chosen = _mask_leaves(state.config.mask, params, len(p_leaves))

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
    for p, d, keep in zip(p_leaves, e_dirs, chosen, strict=True)
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


def _multi_output_fusion() -> bool:
  """Whether XLA may compute several arrays in one kernel (a multi-output fusion).

  XLA:GPU and XLA:TPU do; XLA:CPU only with the backend option
  ``--xla_backend_extra_options=xla_cpu_use_multi_output_fusion``.
  """
  if jax.default_backend() != "cpu":
    return True
  return "xla_cpu_use_multi_output_fusion" in os.environ.get("XLA_FLAGS", "")


def _ordered_after(tree: Any, after: Any) -> Any:
  """``tree`` unchanged, but data-dependent on ``after`` as XLA sees it.

  ``fsam`` updates the moving average in place (when the state is donated)
  from the clean gradient. The perturbation reads the old average too. With
  multi-output fusion XLA computes ``theta + e`` and the new average in one
  kernel, and nothing is to be done. Without it, XLA cannot order the two
  readers before scheduling, so it copies the whole average first (as it
  must when a schedule puts the perturbation inside a ``lax.cond``). Tying
  the clean gradient to one element of the perturbed gradient (computed
  after the perturbation) orders them: ``never`` is always false (no value
  is both finite and NaN), so the select returns ``tree`` bit for bit, fused
  into the update at no cost.
  """
  anchors = [x.reshape(-1)[0] for x in jax.tree.leaves(after) if x.size]
  if not anchors:
    return tree
  never = jnp.isfinite(anchors[0]) & jnp.isnan(anchors[0])
  return jax.tree.map(lambda x: jnp.where(never, jnp.zeros_like(x), x), tree)


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

  Returns:
    A function ``(params, opt_state, *args, **kwargs) -> (value, grads)``.

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
  value_and_grad = jax.value_and_grad(fun, has_aux=has_aux)
  mean = functools.partial(jax.lax.pmean, axis_name=axis_name) if axis_name else (lambda x: x)

  def grad_fn(params: Any, opt_state: Any, *args: Any, **kwargs: Any) -> Any:
    found = find_fsam_state(opt_state)
    state = found.state
    config = state.config
    if axis_name is not None:
      params = _vary(params, axis_name)
    out, local_grads = value_and_grad(params, *args, **kwargs)
    take = is_sam_step(config.every, config.probability, config.seed, _scalar(state.count))
    # The averaged clean gradient perturbs in global mode and feeds the moving
    # average; per-device SAM needs neither, so it skips that all-reduce
    # (unless skipped steps must hand it to the base optimizer).
    grads = None
    if perturbation == "global" or state.ema is not None or take is not None:
      grads = mean(local_grads)
    direction = grads if perturbation == "global" else local_grads

    def sam_pass() -> tuple:
      perturbed_params, norm, e_leaves = perturb(params, direction, state, found.hyperparams)
      out_p, perturbed_grads = value_and_grad(perturbed_params, *args, **kwargs)
      diag = (norm, _norm(e_leaves).astype(norm.dtype)) if return_diagnostics else ()
      return mean(perturbed_grads), out_p[0] if has_aux else out_p, diag

    def one_pass() -> tuple:
      # Steps the schedule skips: the clean gradient in place of g', and
      # zero norms (no perturbation was made).
      zero = jnp.zeros([], _acc_dtype([jnp.asarray(p) for p in jax.tree.leaves(params)]))
      if axis_name is not None and (config.adaptive or perturbation == "per_device"):
        zero = _vary(zero, axis_name)  # as varying as the norms of sam_pass
      diag = (zero, zero) if return_diagnostics else ()
      return grads, out[0] if has_aux else out, diag

    if take is None:
      perturbed_grads, local_value_p, diag = sam_pass()
    else:
      # A skipped step runs one pass: lax.cond executes one branch (under
      # vmap of a batched count it becomes a select and runs both).
      perturbed_grads, local_value_p, diag = jax.lax.cond(take, sam_pass, one_pass)
    if state.ema is None:
      sam_grads = jax.tree.map(lambda gp: SAMGrad(gp, None), perturbed_grads)
    else:
      clean = grads
      if take is not None or not _multi_output_fusion():
        clean = _ordered_after(grads, perturbed_grads)
      sam_grads = jax.tree.map(SAMGrad, perturbed_grads, clean)
    value = mean(out[0] if has_aux else out)
    result = ((value, out[1]) if has_aux else value), sam_grads
    if not return_diagnostics:
      return result
    return (*result, SAMDiagnostics(value, mean(local_value_p), *diag))

  return grad_fn
