"""The two-pass gradient that the SAM-family transformations consume.

One call of the returned function is one SAM step, in named parts:

1. :func:`_clean_pass`: the loss and gradient ``g`` at ``theta``, averaged
   over the data axes.
2. :func:`_perturb`: the state at the front of the chain gives the direction
   ``d`` (:meth:`SAMState.direction`), scaled to the radius: ``theta + e``.
3. :func:`_perturbed_pass`: the loss and gradient ``g'`` at ``theta + e``; or, on a
   one-pass step, :func:`_one_pass_step` hands on ``g``.
4. The state makes what the update consumes (:meth:`SAMState.combine`: a
   ``SAMGrad`` a leaf), in the same branch as the pass (the host's
   ``sam_step`` compiles one branch; the schedule's ``lax.cond`` on the device
   runs one of both; either way the rules know which one statically);
   returned with :class:`SAMDiagnostics`, the transformation's update turns
   them into the base optimizer's gradient.

With ``perturbation="per_device"`` the direction and what ``combine`` returns
are made from each data replica's own ``g`` and ``g'``, and the latter is then
averaged.

The parallel layout (:class:`fsam_optax._layout.Layout`) supplies every mean
and norm; the maths is in :mod:`fsam_optax._perturbation`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fsam_optax._accumulate import accumulated
from fsam_optax._diagnostics import PerturbationNorms, SAMDiagnostics
from fsam_optax._layout import Layout, Perturbation
from fsam_optax._lookup import find_sam_state
from fsam_optax._loss_scale import scaled_value_and_grad
from fsam_optax._mask import mask_leaves
from fsam_optax._method import Direction, SAMState, SAMStep, method_name
from fsam_optax._model import Bound, bind
from fsam_optax._pairs import SAMGrad
from fsam_optax._perturbation import (
  acc_dtype,
  applied_norm,
  clip_by_global_norm,
  perturbation,
  shifted,
)
from fsam_optax._randomness import (
  SecondPassRng,
  check_rng_options,
  resolve_rng_arg,
  second_pass_args,
)
from fsam_optax._schedule import device_choice


class _CleanPass(NamedTuple):
  value: jax.Array  # this device's loss at theta
  aux: Any
  rngs: Any  # an NNX model's RNG streams as the pass left them (None for the others)
  rest: Any  # its other Variables (BatchNorm statistics) as the pass left them
  grads: Any  # g, averaged over the data axes (None where nothing needs it)
  for_rules: Any  # g as the method's rules take it: averaged, or the replica's own per device


class _SecondPass(NamedTuple):
  grads: Any  # g' (g on a skipped step), averaged, or the replica's own per device
  value: jax.Array  # this device's loss at theta + e (at theta on a skipped step)
  norms: PerturbationNorms | None  # with return_diagnostics only
  rngs: Any  # an NNX model's RNG streams as the step leaves them


class _HandedOn(NamedTuple):
  grads: Any  # the method's SAMGrad tree, the replica's own per device
  value: jax.Array  # as _SecondPass.value
  norms: PerturbationNorms | None  # with return_diagnostics only
  grad_norm: jax.Array | None  # ||g'|| averaged over the data axes, with return_diagnostics
  rngs: Any  # as _SecondPass.rngs


def _clip(tree: Any, max_norm: float | None, layout: Layout) -> Any:
  return tree if max_norm is None else clip_by_global_norm(tree, max_norm, layout.total)


def _with_state(call: Callable[..., Any], has_aux: bool) -> Callable[..., Any]:
  """``call`` as a loss for ``jax.value_and_grad(..., has_aux=True)``: aux ``(aux, rngs, rest)``."""

  def loss(params: Any, rngs: Any, rest: Any, *args: Any, **kwargs: Any) -> Any:
    out, rngs, rest = call(params, rngs, rest, *args, **kwargs)
    value, aux = (out[0], out[1]) if has_aux else (out, None)
    return jnp.asarray(value), (aux, rngs, rest)

  return loss


def _clean_pass(
  value_and_grad: Callable[..., Any],
  layout: Layout,
  model: Bound,
  call: tuple[tuple, dict],
  *,
  clip: float | None,
  needs_mean: bool,
) -> _CleanPass:
  """``g`` at ``theta`` (differentiated at params varying over the data axes: local gradients)."""
  (value, (aux, rngs, rest)), local = value_and_grad(
    layout.vary(model.params), model.rngs, model.rest, *call[0], **call[1]
  )
  grads = _clip(layout.mean_grads(local), clip, layout) if needs_mean else None
  for_rules = _clip(local, clip, layout) if layout.per_device else grads
  return _CleanPass(value, aux, rngs, rest, grads, for_rules)


def _perturb(
  state: SAMState, step: SAMStep, params: Any, direction: Any, diagnose: bool
) -> tuple[Any, PerturbationNorms | None]:
  """``theta + e`` from the params as given (so norms stay replicated unless per device)."""
  theta, treedef = jax.tree.flatten(params)
  # Python-number leaves (a temperature, say) have no dtype until made arrays.
  theta = [jnp.asarray(p) for p in theta]
  g = jax.tree.leaves(direction)
  method = method_name(state)
  given = state.direction(g, step)
  d, norm = (given.leaves, given.norm) if isinstance(given, Direction) else (given, None)
  if norm is not None:
    norm = _checked_norm(norm, method, state.config.adaptive)
  _check_direction(d, g, method)
  # F-SAM spells d apart for the step (a private hook, tuning for XLA: it then
  # computes d inside the step's kernel instead of storing it).
  for_step = getattr(state, "_direction_for_step", None)
  d_step = d if for_step is None else for_step(g, step)
  _check_direction(d_step, g, method)
  e, n = perturbation(
    theta,
    d,
    d_step,
    step.hyperparam("rho"),
    step.hyperparam("eps"),
    adaptive=state.config.adaptive,
    mask=step._mask,
    total=step._layout.total,
    norm=norm,
  )
  moved = shifted(theta, e)
  norms = None
  if diagnose:
    layout = step._layout
    e_norm, applied = layout.norm(e), applied_norm(theta, moved, layout.total)
    norms = PerturbationNorms(n, e_norm.astype(n.dtype), applied.astype(n.dtype))
  return jax.tree.unflatten(treedef, moved), norms


def _perturbed_pass(
  value_and_grad: Callable[..., Any],
  layout: Layout,
  perturbed: Any,
  norms: PerturbationNorms | None,
  call: tuple[tuple, dict],
  state: tuple[Any, Any],
  *,
  like: jax.Array,
) -> _SecondPass:
  """``g'`` at ``theta + e``: averaged over the data axes, or the replica's own per device.

  ``state`` is the model's RNG streams and other Variables this pass starts from.
  """
  (value, (_, rngs, _)), local = value_and_grad(layout.vary(perturbed), *state, *call[0], **call[1])
  # In the clean loss's dtype (`like`): a Python-number leaf is weakly typed at
  # theta but not at theta + e, and may promote a low-precision loss.
  grads = local if layout.per_device else layout.mean_grads(local)
  return _SecondPass(grads, value.astype(like.dtype), norms, rngs)


def _one_pass_step(clean: _CleanPass, layout: Layout, params: Any, diagnose: bool) -> _SecondPass:
  """A step the schedule skips: ``g`` in place of ``g'``, and zero norms (nothing was perturbed)."""
  norms = None
  if diagnose:
    zero = jnp.zeros([], acc_dtype([jnp.asarray(p) for p in jax.tree.leaves(params)]))
    zero = layout.vary_if_per_device(zero)
    norms = PerturbationNorms(zero, zero, zero)
  return _SecondPass(clean.for_rules, clean.value, norms, clean.rngs)


def _averaged(grads: Any, layout: Layout) -> Any:
  """Gradients averaged over the data axes (per device, each replica holds its own)."""
  return layout.mean_grads(grads) if layout.per_device else grads


def _hand_on(
  state: SAMState, second: _SecondPass, clean: _CleanPass, step: SAMStep, diagnose: bool
) -> _HandedOn:
  """The method's ``SAMGrad`` tree from ``g'`` (or ``g``) and ``g``, and what diagnostics need."""
  perturbed, treedef = jax.tree.flatten(second.grads)
  combine = getattr(state, "combine", None)
  if combine is None:
    handed = [SAMGrad(gp) for gp in perturbed]
  else:
    handed = combine(perturbed, jax.tree.leaves(clean.for_rules), step)
    _check_handed(handed, perturbed, _buffer_leaves(state), method_name(state))
    handed = [_non_finite_with_its_term(x) for x in handed]
  # Per device, both branches of a schedule's cond hand on the replica's own.
  grads = step._layout.vary_if_per_device(jax.tree.unflatten(treedef, handed))
  norm = None
  if diagnose:
    norm = step._layout.norm(jax.tree.leaves(_averaged(second.grads, step._layout)))
  return _HandedOn(grads, second.value, second.norms, norm, second.rngs)


def _device_choice(
  take: jax.Array,
  two_passes: Callable[[], _HandedOn],
  one_pass: Callable[[], _HandedOn],
  layout: Layout,
) -> _HandedOn:
  """``lax.cond(take, two_passes, one_pass)``; zero terms on the one-pass branch if need be.

  A method whose two-pass step adds ``after_base`` terms and whose one-pass step
  adds none gives branches of different structures; only then (found when the
  cond refuses them) the two-pass step is traced for its shapes, and the
  one-pass branch hands on zeros where it has terms.
  """
  try:
    return jax.lax.cond(take, two_passes, one_pass)
  except TypeError:
    is_samgrad = lambda x: isinstance(x, SAMGrad)
    shapes = jax.tree.leaves(jax.eval_shape(two_passes).grads, is_leaf=is_samgrad)
    if all(x.after_base is None for x in shapes):
      raise

  def one_pass_with_zero_terms() -> _HandedOn:
    handed = one_pass()
    leaves, treedef = jax.tree.flatten(handed.grads, is_leaf=is_samgrad)
    filled = [
      x
      if s.after_base is None or x.after_base is not None
      else x._replace(after_base=jnp.zeros_like(x.grad))
      for x, s in zip(leaves, shapes, strict=True)
    ]
    grads = layout.vary_if_per_device(jax.tree.unflatten(treedef, filled))
    return handed._replace(grads=grads)

  return jax.lax.cond(take, two_passes, one_pass_with_zero_terms)


def _non_finite_with_its_term(handed: SAMGrad) -> SAMGrad:
  """``handed`` with its gradient non-finite wherever its ``after_base`` term is.

  The term bypasses the base optimizer, so a guard that reads the gradients
  (``skip_nonfinite``, ``optax.apply_if_finite``) must see it to leave the step out.
  """
  if handed.after_base is None:
    return handed
  nan = jnp.asarray(jnp.nan, handed.grad.dtype)
  return handed._replace(grad=jnp.where(jnp.isfinite(handed.after_base), handed.grad, nan))


def _check_buffer(state: SAMState, n_leaves: int) -> None:
  """A ValueError unless the state's buffer has a leaf for each of the params' leaves."""
  name = state.config.buffer
  buffer = None if name is None else getattr(state, name, None)
  if buffer is not None and len(jax.tree.leaves(buffer)) != n_leaves:
    raise ValueError(
      f"sam_value_and_grad: params have {n_leaves} leaves but the `{name}` of the "
      f"{method_name(state)} state covers {len(jax.tree.leaves(buffer))}; initialise the "
      "optimizer with the same params you pass here."
    )


def _checked_norm(norm: Any, method: str, adaptive: bool) -> jax.Array:
  """A ``Direction``'s norm as a float scalar array, or a ValueError naming ``method``."""
  if adaptive:
    raise ValueError(
      f"{method}: its direction comes with a norm of its own, which `adaptive=True` "
      "would replace; build it without `adaptive`."
    )
  norm = jnp.asarray(norm)
  if norm.shape != () or not jnp.issubdtype(norm.dtype, jnp.floating):
    raise ValueError(
      f"{method}: the norm of its `Direction` must be a floating-point scalar, got "
      f"{norm.dtype}{list(norm.shape)}."
    )
  return norm


def _check_direction(d: Any, g: list[jax.Array], method: str) -> None:
  """A ValueError naming ``method`` unless ``direction`` gave an array like ``g`` a leaf."""
  if not isinstance(d, list | tuple) or len(d) != len(g):
    raise ValueError(
      f"{method}: `direction` must return a list of arrays, one for each of the {len(g)} "
      f"gradient leaves (or a fsam_optax.Direction of one), got {type(d).__name__}"
      + (f" of length {len(d)}." if isinstance(d, list | tuple) else ".")
    )
  for i, (x, gx) in enumerate(zip(d, g, strict=True)):
    x = jnp.asarray(x)
    if x.shape != gx.shape or not jnp.issubdtype(x.dtype, jnp.inexact):
      raise ValueError(
        f"{method}: `direction` at leaf {i} is {x.dtype}{list(x.shape)}, where the "
        f"gradient is {gx.dtype}{list(gx.shape)}."
      )


def _buffer_leaves(state: SAMState) -> list[jax.Array] | None:
  """The leaves of the state's buffer, or ``None`` for a method without one."""
  name = state.config.buffer
  buffer = None if name is None else getattr(state, name, None)
  return None if buffer is None else jax.tree.leaves(buffer)


def _check_handed(
  handed: Any, perturbed: list[jax.Array], buffer: list[jax.Array] | None, method: str
) -> None:
  """A ValueError naming ``method`` unless ``combine`` gave a SAMGrad like the state's a leaf.

  Its ``grad`` is shaped and typed as the gradient; its ``buffer`` as the state's
  buffer, present exactly when the method keeps one.
  """
  if not isinstance(handed, list | tuple) or len(handed) != len(perturbed):
    length = f" of length {len(handed)}" if isinstance(handed, list | tuple) else ""
    raise ValueError(
      f"{method}: `combine` must return a list of fsam_optax.SAMGrad, one for each of the "
      f"{len(perturbed)} gradient leaves, got {type(handed).__name__}{length}."
    )
  for i, (out, gp) in enumerate(zip(handed, perturbed, strict=True)):
    if not isinstance(out, SAMGrad):
      raise ValueError(
        f"{method}: `combine` must return fsam_optax.SAMGrad leaves, got "
        f"{type(out).__name__} at leaf {i}."
      )
    _check_like(
      out.grad, gp, f"`combine`'s gradient at leaf {i}", "the parameter's gradient", method
    )
    if buffer is None and out.buffer is not None:
      raise ValueError(
        f"{method}: `combine` returns a buffer at leaf {i}, but the method keeps none; "
        "name the state's field for it with method_transformation(..., buffer=...)."
      )
    if out.after_base is not None:
      _check_like(out.after_base, gp, f"`combine`'s after_base at leaf {i}", "the gradient", method)
    if buffer is not None:
      if out.buffer is None:
        raise ValueError(f"{method}: `combine` returns no buffer at leaf {i} for the state.")
      _check_like(out.buffer, buffer[i], f"`combine`'s buffer at leaf {i}", "the state's", method)


def _check_like(x: Any, like: jax.Array, what: str, whose: str, method: str) -> None:
  x = jnp.asarray(x)
  if x.shape != like.shape or x.dtype != like.dtype:
    raise ValueError(
      f"{method}: {what} is {x.dtype}{list(x.shape)}, where {whose} is "
      f"{like.dtype}{list(like.shape)}; cast it with .astype({like.dtype})."
    )


def _diagnostics(clean: _CleanPass, second: _HandedOn, layout: Layout) -> SAMDiagnostics:
  assert second.norms is not None and second.grad_norm is not None
  return SAMDiagnostics(
    value=layout.mean(clean.value),
    perturbed_value=layout.mean(second.value),
    direction_norm=second.norms.direction,
    perturbation_norm=second.norms.perturbation,
    applied_perturbation_norm=second.norms.applied,
    clean_grad_norm=layout.norm(jax.tree.leaves(clean.grads)),
    perturbed_grad_norm=second.grad_norm,
  )


def _check_sam_step(sam_step: Any) -> bool | None:
  """``sam_step`` as a Python bool (or ``None``), or a ValueError saying how to make it static."""
  if sam_step is None or isinstance(sam_step, bool | np.bool_):
    return None if sam_step is None else bool(sam_step)
  got = "a JAX array" if isinstance(sam_step, jax.Array) else f"{type(sam_step).__name__}"
  raise ValueError(
    f"sam_value_and_grad: `sam_step` must be a Python bool or None, got {got}. It decides "
    "what is compiled, so it is static: `jax.jit(train_step, static_argnames='sam_step')` "
    "(`nnx.jit` the same; `eqx.filter_jit` keeps a bool static; `jax.pmap` takes "
    "`static_broadcasted_argnums`), with `sam_step=fsam_optax.is_sam_step(opt_state, i)`. "
    "For a choice made on the device, leave it None: the state's schedule decides."
  )


def _check_options(
  micro_batches: int | None,
  rng_arg: int | str | None,
  second_pass_rng: str,
  clip_clean_grad: float | None,
) -> None:
  if micro_batches is not None and (
    isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or micro_batches < 1
  ):
    raise ValueError(
      "sam_value_and_grad: `micro_batches` must be a positive int (or None), "
      f"got {micro_batches!r}."
    )
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
  """Clean loss and SAM-family gradients of ``fun``, for :func:`fsam_optax.fsam` and the others.

  The returned function takes ``(params, opt_state, *args, **kwargs)``. It
  finds the state of the method first in the chain (``fsam``, ``sam``,
  ``gsam``, ``vasso``, ``looksam``, ``wsam`` or one built with
  :func:`fsam_optax.method_transformation`) in ``opt_state`` (under ``optax.chain``,
  ``named_chain``, ``inject_hyperparams`` or in an ``nnx.Optimizer``),
  takes the gradient ``g`` of ``fun`` at ``params``, builds the perturbation
  ``e`` from ``g`` and the state, and takes the gradient ``g'`` at
  ``params + e``. It returns ``(value, grads)``, or ``((value, aux), grads)``
  with ``has_aux``, where ``value`` and ``aux`` come from the clean pass and
  ``grads`` has the structure of ``params`` with a
  :class:`SAMGrad` at each leaf (the gradient the base optimizer receives,
  ``g'`` for most methods, and the method's new buffer): pass it unchanged
  to ``tx.update`` (or ``TrainState.apply_gradients``, ``nnx.Optimizer.update``).

  ``params`` may also be a whole model, in its framework's idiom:

  - an ``nnx.Module``, with the ``nnx.Optimizer`` (or its ``opt_state``)
    second and ``fun(model, *args)``: the optimizer's ``wrt`` Variables are
    differentiated (``nnx.Param`` beside a bare ``opt_state``) and ``grads``
    is an ``nnx.State`` of them for ``optimizer.update(model, grads)``. Both
    passes run on copies of the model as the clean pass found it; the model
    then holds what the clean pass wrote to its other Variables (BatchNorm
    statistics, also on a step that ``skip_nonfinite`` refuses) and its RNG
    streams after the passes that drew from them (``second_pass_rng``). Under
    ``jit`` only: inside ``shard_map`` or ``pmap`` (``axis_name``), pass the
    split parameters and carry the other Variables through the loss;
  - an ``equinox.Module``: its inexact arrays are differentiated and its
    other leaves passed through, as ``eqx.filter_value_and_grad`` does;
    ``grads`` has ``None`` at the leaves that are not differentiated.

  A leaf of a plain parameter tree that cannot be differentiated (an integer
  array, a function) is refused with its path.

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
      ``"per_device"`` runs the method's rules on each data replica's own
      gradients ("m-sharpness"): each perturbs with its local gradient, and
      what the rules hand on (what ``combine`` returns: ``g'``, GSAM's combination, the
      state's inputs) is averaged afterwards, so the state stays identical on
      every device (F-SAM's moving average is fed the averaged clean
      gradient). With ``param_specs`` a replica is the group of devices that
      share a batch shard, and its norms are over the full tree.
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
      being 0, or its parameter name), for dropout and other randomness. Read
      against ``fun``'s signature, a name finds the key whether it is passed
      by keyword or positionally (and so does a position); a name that is not
      a parameter of ``fun`` (nor, for ``**kwargs``, a keyword of the call) is
      refused.
    second_pass_rng: the randomness of the second pass. ``"fresh"`` (the
      default, as the official code, where each forward pass draws its own
      dropout mask) gives the key named by ``rng_arg`` as
      ``jax.random.fold_in(key, 1)``, and an NNX model's RNG streams continue
      where the clean pass left them; ``"same"`` gives both passes the same
      key and restarts the streams where the clean pass began. Otherwise both
      passes receive the same arguments.
    clip_clean_grad: if set, the clean gradient is clipped to this global
      norm (as ``optax.clip_by_global_norm``) before it forms the direction
      and feeds the moving average. On a step that a schedule skips, the
      base optimizer receives this clipped clean gradient.

  The returned function also takes a keyword ``sam_step`` (consumed, not
  passed to ``fun``): a Python bool that chooses the step on the host, over
  the state's schedule. ``True`` compiles the two-pass step alone; ``False``
  the one-pass step that the method takes between its SAM steps (the base
  optimizer receives ``g``, F-SAM's and VaSSO's averages are fed ``g``;
  LookSAM reuses its ``g_v``), with neither holding a conditional. ``None``
  (the default) leaves the choice to the state's schedule (``every``,
  ``probability``), made on the device from its count. Make it static
  (``jax.jit(..., static_argnames="sam_step")``) and take it from
  :func:`fsam_optax.is_sam_step`: on a GPU or TPU the device's choice waits
  for the clean pass before it launches the rest, and saves little.

  It also takes a keyword ``loss_scale`` (consumed, not
  passed to ``fun``) for float16 training: the loss is multiplied by it in
  both passes and the gradients divided by it before they form the direction,
  its norm, and the returned gradients. It may change between steps (a traced
  value); skip steps with non-finite gradients, e.g. with
  ``optax.chain(fsam(..., skip_nonfinite=True), optax.apply_if_finite(base, k))``.

  Returns:
    A function ``(params, opt_state, *args, sam_step=None, loss_scale=None,
    **kwargs) -> (value, grads)``.

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
    >>> bool(jnp.allclose(whole[1].grad, split[1].grad))
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
  layout = Layout.create(
    axis_name, perturbation, param_specs, average_aux=average_aux, has_aux=has_aux
  )
  _check_options(micro_batches, rng_arg, second_pass_rng, clip_clean_grad)
  key_at = resolve_rng_arg(fun, rng_arg)

  def grad_fn(
    params: Any,
    opt_state: Any,
    *args: Any,
    sam_step: bool | None = None,
    loss_scale: Any = None,
    **kwargs: Any,
  ) -> Any:
    host_choice = _check_sam_step(sam_step)
    model = bind(fun, params, opt_state)
    if model.rest is not None and layout.data_axes:
      raise ValueError(
        "sam_value_and_grad: an nnx.Module is taken whole under jit (with sharded arrays) "
        "only; with `axis_name` (inside shard_map or pmap) each replica would write its "
        "own statistics into the model. Split it and pass its parameters: "
        "`nnx.split(model, nnx.Param, ...)`, carrying the other Variables through the loss "
        "(as aux, averaged with `average_aux=True`)."
      )
    found = find_sam_state(opt_state)
    state: SAMState = found.state
    bound = layout.bind(model.params)
    scaled = scaled_value_and_grad(_with_state(model.call, has_aux), has_aux=True)
    value_and_grad: Callable[..., Any] = functools.partial(scaled, loss_scale)
    if micro_batches is not None:
      value_and_grad = accumulated(value_and_grad, micro_batches)
    config = state.config
    n_leaves = len(jax.tree.leaves(model.params))
    _check_buffer(state, n_leaves)
    take = device_choice(*config.schedule, found.step_count) if host_choice is None else host_choice
    step = SAMStep(
      True,
      found.hyperparam,
      [jnp.asarray(p) for p in jax.tree.leaves(model.params)],
      bound,
      mask_leaves(config.mask, n_leaves, method_name(state)),
    )
    # Per device, the method's rules run on each replica's own gradients and
    # only what they hand on is averaged: g itself is averaged only to report it.
    clean = _clean_pass(
      value_and_grad,
      bound,
      model,
      (args, kwargs),
      clip=clip_clean_grad,
      needs_mean=not bound.per_device or return_diagnostics,
    )
    second_call = second_pass_args(args, kwargs, key_at, second_pass_rng)
    # The perturbed pass sees the model as the clean pass found it, but for its
    # RNG streams: continued ("fresh") or restarted ("same").
    second_state = (clean.rngs if second_pass_rng == "fresh" else model.rngs, model.rest)

    def two_passes() -> _HandedOn:
      perturbed, norms = _perturb(state, step, model.params, clean.for_rules, return_diagnostics)
      second = _perturbed_pass(
        value_and_grad, bound, perturbed, norms, second_call, second_state, like=clean.value
      )
      return _hand_on(state, second, clean, step, return_diagnostics)

    def one_pass() -> _HandedOn:
      second = _one_pass_step(clean, bound, model.params, return_diagnostics)
      one_pass_step = dataclasses.replace(step, two_pass=False)
      return _hand_on(state, second, clean, one_pass_step, return_diagnostics)

    # A one-pass step runs one pass: the host's choice compiles one branch;
    # the device's lax.cond executes one (under vmap of a batched count it
    # becomes a select and runs both).
    if take is None or take is True:
      second = two_passes()
    elif take is False:
      second = one_pass()
    else:
      second = _device_choice(take, two_passes, one_pass, bound)
    # The model keeps what the clean pass wrote, and its RNG streams as the
    # passes that drew from them left them, so that no key is used twice.
    model.write_back(second.rngs if second_pass_rng == "fresh" else clean.rngs, clean.rest)
    grads = second.grads
    if bound.per_device:
      # No parameter is split over a data axis per device (the layout refuses
      # FSDP then), so a plain mean averages every leaf of the SAMGrad tree.
      grads = bound.mean(grads)
    value = bound.mean(clean.value)
    result = ((value, bound.sync_aux(clean.aux)) if has_aux else value), grads
    return (*result, _diagnostics(clean, second, bound)) if return_diagnostics else result

  return grad_fn
