"""The two-pass gradient that :func:`fsam_optax.fsam` consumes."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

from fsam_optax._accumulate import accumulated
from fsam_optax._fsam import FSAMState, SAMGrad
from fsam_optax._lookup import find_fsam_state
from fsam_optax._precision import acc_dtype, applied_norm, scaled_value_and_grad
from fsam_optax._randomness import SecondPassRng, check_rng_options, second_pass_args
from fsam_optax._schedule import is_sam_step
from fsam_optax._sharding import (
  Axes,
  average_over_data,
  axis_names,
  check_layout,
  leaf_axes,
  sum_over_shards,
  vary,
)

Perturbation = Literal["global", "per_device"]


class SAMDiagnostics(NamedTuple):
  """Per-step quantities that come for free with the two passes.

  Attributes:
    value: loss at the weights ``theta`` (the clean pass).
    perturbed_value: loss at ``theta + e`` (the second pass); on a step
      that a schedule (``every``, ``probability``) skips, the clean loss.
    direction_norm: global norm ``n`` of the direction ``d`` (of ``|theta| d``
      in adaptive mode), before scaling to the radius; 0 on a skipped step.
    perturbation_norm: global norm of the perturbation ``e`` (``rho`` for
      the non-adaptive perturbation); 0 on a skipped step.
    applied_perturbation_norm: global norm of the perturbation actually
      applied, ``(theta + e) - theta`` with ``theta + e`` rounded to the
      params' dtype. When that dtype cannot resolve ``e`` (bfloat16 weights)
      it differs from ``perturbation_norm``: lower where ``theta + e`` rounds
      back to ``theta``, and possibly higher where a weight jumps a whole
      step of its dtype instead of ``e_i``; 0 on a skipped step.
    clean_grad_norm: global norm of the clean gradient ``g`` (averaged over
      ``axis_name``; after ``clip_clean_grad``).
    perturbed_grad_norm: global norm of the perturbed gradient ``g'``; on a
      skipped step, of the clean gradient handed on in its place.
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


def _add(squares: list[Any]) -> jax.Array:
  # The squared norm of unsharded params: the sum of the leaves' squared sums.
  kept = [s for s in squares if s is not None]
  return sum(kept[1:], kept[0]) if kept else jnp.zeros([])


def _multi_output_fusion() -> bool:
  """Whether XLA may compute several arrays in one kernel (a multi-output fusion).

  XLA:GPU and XLA:TPU do; XLA:CPU only with the backend option
  ``--xla_backend_extra_options=xla_cpu_use_multi_output_fusion``. Decided
  when the step is traced, from the default backend: a step compiled for
  another backend than the default gets the other layout, which changes
  its speed and possibly the last bits, never the maths.
  """
  if jax.default_backend() != "cpu":
    return True
  return "xla_cpu_use_multi_output_fusion" in os.environ.get("XLA_FLAGS", "")


def perturb(
  params: Any,
  grads: Any,
  state: FSAMState,
  live: Any,
  total: Callable[[list[Any]], jax.Array] = _add,
) -> tuple[Any, jax.Array, list]:
  """Returns ``theta + e``, the direction norm ``n`` and the leaves of ``e``.

  Masked-out leaves get no perturbation, and ``None`` in place of theirs.
  ``total`` maps the per-leaf squared sums (``None`` for masked-out leaves)
  to the squared norm of the whole tree; on sharded params it adds them over
  the devices that hold the shards.
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
    # once, XLA computes it once and stores it for both readers. Spelled
    # g + (-sigma) m the second time (bit for bit the same value in IEEE
    # arithmetic), it is recomputed inside each reader and never stored, so
    # that with multi-output fusion theta + e and the new average come from
    # one kernel that reads m once. Without that fusion (XLA:CPU by default),
    # storing d timed faster, though it writes one more parameter-size buffer.
    # Both give d the same values; what XLA fuses downstream may round the
    # step differently in the last bits.
    d_leaves = [(g - sigma * m).astype(g.dtype) for g, m in zip(g_leaves, ema, strict=True)]
    e_dirs = d_leaves
    if _multi_output_fusion():
      e_dirs = [(g + (-sigma) * m).astype(g.dtype) for g, m in zip(g_leaves, ema, strict=True)]
  rho = _hyperparam("rho", state, live)
  eps = _hyperparam("eps", state, live)
  adaptive = state.config.adaptive
  chosen = _mask_leaves(state.config.mask, len(p_leaves))

  acc = acc_dtype(p_leaves)

  def weighted(p: jax.Array, d: jax.Array, power: int) -> jax.Array:
    # |theta|**power * d in `acc`, not in the params' dtype: in float16 the
    # product overflows to inf (and e to NaN) already for |theta|, |d| ~ 300.
    d = d.astype(acc)
    return jnp.abs(p).astype(acc) ** power * d if adaptive else d

  sq = [
    jnp.sum(jnp.square(weighted(p, d, 1))) if keep else None
    for p, d, keep in zip(p_leaves, d_leaves, chosen, strict=True)
  ]
  norm = jnp.sqrt(total(sq).astype(acc))
  scale = rho.astype(acc) / (norm + eps.astype(acc))
  e_leaves = [
    (scale * weighted(p, d, 2)).astype(p.dtype) if keep else None
    for p, d, keep in zip(p_leaves, e_dirs, chosen, strict=True)
  ]
  perturbed = [p if e is None else p + e for p, e in zip(p_leaves, e_leaves, strict=True)]
  return jax.tree.unflatten(treedef, perturbed), norm, e_leaves


def _norm(leaves: list, total: Callable[[list[Any]], jax.Array]) -> jax.Array:
  acc = acc_dtype([x for x in leaves if x is not None])
  squares = [None if x is None else jnp.sum(jnp.square(x.astype(acc))) for x in leaves]
  return jnp.sqrt(total(squares).astype(acc))


def _average(tree: Any, axes: Axes) -> Any:
  return jax.lax.pmean(tree, axes) if axes else tree


def _average_aux(aux: Any, axes: Axes) -> Any:
  def one(path: Any, x: Any) -> jax.Array:
    if not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
      raise ValueError(
        "sam_value_and_grad: average_aux=True averages every aux leaf over `axis_name`, "
        f"but the aux leaf at {jax.tree_util.keystr(path)} is {jnp.result_type(x)}, "
        "not floating point; return it as a float or leave average_aux off and reduce "
        "it yourself."
      )
    return jax.lax.pmean(x, axes)

  return jax.tree_util.tree_map_with_path(one, aux)


def _ordered_after(tree: Any, after: Any) -> Any:
  """``tree`` unchanged, but data-dependent on ``after`` as XLA sees it.

  ``fsam`` updates the moving average in place (when the state is donated)
  from the clean gradient. When a schedule puts the perturbation, which reads
  the old average, inside a ``lax.cond``, XLA cannot order the two before
  scheduling, so it copies the whole average first. Tying each leaf of the
  clean gradient to one element of the same leaf of the perturbed gradient
  (computed after the perturbation) orders them, and keeps the leaf's
  sharding type under ``shard_map``: ``never`` is always false (no value is
  both finite and NaN), so the select returns ``tree`` bit for bit, fused
  into the update at no cost.
  """

  def tie(x: jax.Array, anchor: jax.Array) -> jax.Array:
    # Explicitly sharded arrays (Explicit mesh axes) refuse the element slice;
    # they keep XLA's copy, which costs traffic, never correctness.
    spec = getattr(getattr(jax.typeof(anchor), "sharding", None), "spec", ())
    if not anchor.size or any(axis is not None for axis in spec):
      return x
    first = anchor.reshape(-1)[0]
    never = jnp.isfinite(first) & jnp.isnan(first)
    return jnp.where(never, jnp.zeros_like(x), x)

  return jax.tree.map(tie, tree, after)


def sam_value_and_grad(
  fun: Callable[..., Any],
  *,
  has_aux: bool = False,
  axis_name: str | Sequence[str] | None = None,
  perturbation: Perturbation = "global",
  return_diagnostics: bool = False,
  param_specs: Any = None,
  average_aux: bool = False,
  micro_batches: int | None = None,
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

  On one device, and under ``jax.jit`` with sharded arrays (``NamedSharding``,
  FSDP included), nothing needs to be said about the layout: the program
  sees whole arrays. Inside ``jax.shard_map`` or ``jax.pmap`` the function
  sees shards and must be told which mesh axes split the batch
  (``axis_name``) and which split parameters (``param_specs``); every manual
  axis in scope must be one of them, or it raises.

  Args:
    fun: the loss, ``fun(params, *args, **kwargs)``; a scalar, or
      ``(scalar, aux)`` with ``has_aux=True``.
    has_aux: whether ``fun`` returns auxiliary data. Only the clean pass's
      aux is returned (so batch statistics come from it). It is per device
      (statistics of the device's shard of the batch) unless ``average_aux``.
    axis_name: the data axes: the mapped axis (``pmap`` or ``shard_map``), or
      a tuple of mesh axes, over which the batch is split. Gradients and the
      value are averaged over them, so every device gets the result of the
      global batch.
    perturbation: ``"global"`` perturbs with the gradient averaged over
      ``axis_name`` (the single-device algorithm on the global batch);
      ``"per_device"`` perturbs each data replica with its local gradient
      ("m-sharpness") and averages only the perturbed gradients (the moving
      average is still fed the averaged clean gradient, so the state stays
      identical on every device). With ``param_specs`` a replica is the group
      of devices that share a batch shard, and its norm is over the full tree.
    return_diagnostics: also return a :class:`SAMDiagnostics` as a third
      output. Under ``jit`` what is not used is compiled away.
    param_specs: inside ``shard_map`` with parameters split over mesh axes
      (model or tensor parallelism), the ``PartitionSpec`` of each parameter
      as in ``shard_map``'s ``in_specs``: a tree with the structure of the
      params (or a prefix of it; ``P()`` for replicated leaves). Each leaf's
      squared sum is then added over exactly the axes it is split on, so the
      norm is that of the whole, unsharded tree. Needs ``check_vma=True``
      (shard_map's default). A parameter may also be split over a data
      axis (FSDP) if the loss gathers it with ``jax.lax.all_gather``, whose
      gradient sums over the axis; ``perturbation="per_device"`` is then
      refused. Under ``jax.jit`` FSDP needs no ``param_specs``.
    average_aux: average the clean pass's aux over ``axis_name`` (needs
      ``has_aux`` and ``axis_name``), for example to synchronise batch-norm
      statistics across data replicas. Every aux leaf must be floating point.
    micro_batches: split every argument after ``opt_state`` along its first
      axis into this many equal micro-batches and go through them with a
      ``lax.scan`` in each pass: the clean gradient is their mean, one
      perturbation is made from it, and the perturbed gradient is the mean
      over the same micro-batches. For a loss that is a mean over examples
      this equals the whole batch in one call, with the memory of one
      micro-batch. The value is the mean; an aux gets a leading axis of
      length ``micro_batches``. Close over arguments that are not batched.
    rng_arg: which argument of ``fun`` is a PRNG key (its position, params
      being 0, or its keyword name), for dropout and other randomness.
    second_pass_rng: with ``rng_arg``, the key of the second pass:
      ``"fresh"`` (the default, as the official code, where each forward pass
      draws its own dropout mask) gives it ``jax.random.fold_in(key, 1)``;
      ``"same"`` gives both passes the same key. Without ``rng_arg`` both
      passes receive the same arguments.
    clip_clean_grad: if set, the clean gradient is clipped to this global
      norm (as ``optax.clip_by_global_norm``) before it forms the direction
      and feeds the moving average. On a step that a schedule skips, the
      base optimizer receives this clipped clean gradient.

  The returned function also takes a keyword ``loss_scale`` (consumed, not
  passed to ``fun``) for float16 training: the loss is multiplied by it in
  both passes and the gradients divided by it before they form the direction,
  its norm, and the returned pairs. It may change between steps (a traced
  value); skip steps with non-finite gradients, e.g. with
  ``optax.chain(fsam(..., skip_nonfinite=True), optax.apply_if_finite(base, k))``.

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

    Micro-batches give the gradient of the whole batch:

    >>> x = jnp.arange(8.0)
    >>> mse = lambda p, x: jnp.mean((p[0] * x - p[1]) ** 2)
    >>> whole = fsam_optax.sam_value_and_grad(mse)(params, opt_state, x)
    >>> split = fsam_optax.sam_value_and_grad(mse, micro_batches=4)(params, opt_state, x)
    >>> bool(jnp.allclose(whole[1].perturbed, split[1].perturbed))
    True

    Data-parallel inside ``shard_map`` (one device here), with the aux (a
    batch statistic) averaged over the data axis:

    >>> from jax.sharding import PartitionSpec as P
    >>> mesh = jax.make_mesh((1,), ("data",))
    >>> with_stats = lambda p, x: (mse(p, x), jnp.mean(x))
    >>> grad_fn = fsam_optax.sam_value_and_grad(
    ...     with_stats, has_aux=True, axis_name="data", average_aux=True)
    >>> stats = jax.shard_map(lambda p, s, x: grad_fn(p, s, x)[0][1],
    ...     mesh=mesh, in_specs=(P(), P(), P("data")), out_specs=P())
    >>> x_split = jax.device_put(x, jax.NamedSharding(mesh, P("data")))
    >>> print(float(stats(params, opt_state, x_split)))
    3.5

    A model split over a mesh axis inside ``shard_map`` (one device here):

    >>> mesh = jax.make_mesh((1,), ("model",))
    >>> params = jax.device_put(params, jax.NamedSharding(mesh, P("model")))
    >>> grad_fn = fsam_optax.sam_value_and_grad(
    ...     loss, param_specs=P("model"), return_diagnostics=True)
    >>> step = jax.shard_map(lambda p, s: grad_fn(p, s)[2].direction_norm,
    ...     mesh=mesh, in_specs=(P("model"), P()), out_specs=P())
    >>> print(round(float(step(params, opt_state)), 4))
    4.4721
  """
  if not callable(fun):
    raise TypeError(f"sam_value_and_grad: `fun` must be callable, got {type(fun).__name__}.")
  if perturbation not in ("global", "per_device"):
    raise ValueError(
      f"sam_value_and_grad: `perturbation` must be 'global' or 'per_device', got {perturbation!r}."
    )
  data_axes = axis_names(axis_name)
  if perturbation == "per_device" and not data_axes:
    raise ValueError(
      "sam_value_and_grad: perturbation='per_device' needs `axis_name`, the "
      "pmap or shard_map axis that splits the batch."
    )
  if average_aux and not (has_aux and data_axes):
    raise ValueError(
      "sam_value_and_grad: average_aux=True averages the aux over `axis_name`; it "
      "needs has_aux=True and the data axes in `axis_name`."
    )
  if micro_batches is not None and (
    isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or micro_batches < 1
  ):
    raise ValueError(
      "sam_value_and_grad: `micro_batches` must be a positive int (or None), "
      f"got {micro_batches!r}."
    )
  mean = functools.partial(_average, axes=data_axes)
  check_rng_options(rng_arg, second_pass_rng)
  if clip_clean_grad is not None and not clip_clean_grad > 0:
    raise ValueError(
      f"sam_value_and_grad: `clip_clean_grad` must be a norm > 0, got {clip_clean_grad!r}."
    )

  if micro_batches is not None and rng_arg is not None:
    raise ValueError(
      "sam_value_and_grad: `micro_batches` splits every argument along its first "
      "axis, a PRNG key (`rng_arg`) included; draw one key per example in the "
      "batch instead, or leave micro_batches off."
    )
  scaled = scaled_value_and_grad(fun, has_aux)

  def grad_fn(
    params: Any, opt_state: Any, *args: Any, loss_scale: Any = None, **kwargs: Any
  ) -> Any:
    found = find_fsam_state(opt_state)
    state = found.state
    config = state.config
    axes_per_leaf = None if param_specs is None else leaf_axes(param_specs, params)
    check_layout(params, axes_per_leaf, data_axes, per_device=perturbation == "per_device")
    total = _add if axes_per_leaf is None else sum_over_shards(axes_per_leaf)

    def clip(tree: Any) -> Any:
      # optax.clip_by_global_norm's rule, with the norm of the whole tree.
      if clip_clean_grad is None:
        return tree
      norm = _norm(jax.tree.leaves(tree), total)
      return jax.tree.map(
        lambda g: jnp.where(
          norm < clip_clean_grad, g, (g / norm.astype(g.dtype)) * clip_clean_grad
        ),
        tree,
      )

    # The passes differentiate at params marked varying over the data axes (see
    # vary); the perturbation is built from the params as given, so that its
    # norms stay replicated unless they are per replica (per_device).
    theta = params
    if data_axes:
      params = vary(params, data_axes)
    value_and_grad: Callable[..., Any] = functools.partial(scaled, loss_scale)
    if micro_batches is not None:
      value_and_grad = accumulated(value_and_grad, micro_batches, has_aux)
    out, local_grads = value_and_grad(params, *args, **kwargs)
    take = is_sam_step(config.every, config.probability, config.seed, _scalar(state.count))
    # The averaged clean gradient perturbs in global mode and feeds the moving
    # average; per-device SAM needs neither, so it skips that all-reduce
    # (unless skipped steps must hand it to the base optimizer).
    grads = None
    if perturbation == "global" or state.ema is not None or take is not None:
      grads = clip(average_over_data(local_grads, data_axes, axes_per_leaf))
    direction = grads if perturbation == "global" else clip(local_grads)
    args_p, kwargs_p = second_pass_args(args, kwargs, rng_arg, second_pass_rng)

    def sam_pass() -> tuple:
      perturbed_params, norm, e_leaves = perturb(theta, direction, state, found.hyperparams, total)
      diag: tuple[jax.Array, ...] = ()
      if return_diagnostics:
        e_norm = _norm(e_leaves, total).astype(norm.dtype)
        applied = applied_norm(theta, perturbed_params, total).astype(norm.dtype)
        diag = (norm, e_norm, applied)
      if data_axes:
        perturbed_params = vary(perturbed_params, data_axes)
      out_p, perturbed_grads = value_and_grad(perturbed_params, *args_p, **kwargs_p)
      perturbed_grads = average_over_data(perturbed_grads, data_axes, axes_per_leaf)
      # In the clean loss's dtype: a Python-number leaf is weakly typed at theta
      # but not at theta + e, and may promote a low-precision loss.
      value_p = jnp.asarray(out_p[0] if has_aux else out_p)
      value_dtype = jnp.asarray(out[0] if has_aux else out).dtype
      return perturbed_grads, value_p.astype(value_dtype), diag

    def one_pass() -> tuple:
      # Steps the schedule skips: the clean gradient in place of g', and
      # zero norms (no perturbation was made).
      zero = jnp.zeros([], acc_dtype([jnp.asarray(p) for p in jax.tree.leaves(params)]))
      # As varying as the norms of sam_pass: per data replica only per_device.
      if data_axes and perturbation == "per_device":
        zero = vary(zero, data_axes)
      diag = (zero, zero, zero) if return_diagnostics else ()
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
      # Without a schedule XLA orders the update itself where it can fuse it
      # with theta + e; where it cannot (XLA:CPU by default) the copy it makes
      # instead timed no slower than the tie, which keeps g alive longer.
      if take is not None:
        clean = _ordered_after(grads, perturbed_grads)
      sam_grads = jax.tree.map(SAMGrad, perturbed_grads, clean)
    value = mean(out[0] if has_aux else out)
    if has_aux:
      aux = _average_aux(out[1], data_axes) if average_aux else out[1]
    result = ((value, aux) if has_aux else value), sam_grads
    if not return_diagnostics:
      return result
    clean = (
      grads if grads is not None else clip(average_over_data(local_grads, data_axes, axes_per_leaf))
    )
    direction_norm, perturbation_norm, applied_perturbation_norm = diag
    return (
      *result,
      SAMDiagnostics(
        value,
        mean(local_value_p),
        direction_norm,
        perturbation_norm,
        applied_perturbation_norm,
        clean_grad_norm=_norm(jax.tree.leaves(clean), total),
        perturbed_grad_norm=_norm(jax.tree.leaves(perturbed_grads), total),
      ),
    )

  return grad_fn
