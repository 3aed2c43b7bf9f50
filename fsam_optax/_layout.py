"""Where the batch and the parameters live: the parallel layout of one gradient call.

Outside ``shard_map`` and ``pmap`` (one device, or ``jax.jit`` over sharded
arrays) the program sees whole arrays and the layout is empty. Inside them a
device holds one shard of the batch, split over the *data axes*
(``axis_name``), and possibly one shard of each parameter, split over the axes
of its ``PartitionSpec`` (``param_specs``). :class:`Layout` holds both, checks
them against what JAX's types say, and provides the operations that make the
single-device algorithm come out on every device: the mean over the data axes,
and the squared norm of the whole tree, which adds each leaf's local squared
sum over exactly the mesh axes that leaf is split on (replicated leaves are
already whole, and summing them too would count them once per device).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from fsam_optax._perturbation import add, global_inner, global_inner_and_norm, global_norm

Axes = tuple[str, ...]


def axis_names(axis_name: str | Sequence[str] | None) -> Axes:
  """``axis_name`` as a tuple of mesh axis names (empty for ``None``)."""
  if axis_name is None:
    return ()
  names = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
  if not names or not all(isinstance(a, str) for a in names):
    raise ValueError(
      f"sam_value_and_grad: `axis_name` must be an axis name or a tuple of them, got {axis_name!r}."
    )
  return names


def varying_axes(x: Any) -> frozenset[str] | None:
  """The manual mesh axes over which ``x``'s value differs between devices.

  Read from JAX's type of ``x`` (``jax.typeof``): empty outside ``shard_map``
  and ``pmap``, and empty everywhere under ``shard_map(check_vma=False)``.
  ``None`` when this JAX exposes no such set (then nothing can be checked).
  """
  aval = jax.typeof(x)
  # JAX >= 0.8 keeps the set in a `ManualAxisType` under `.mat`; earlier
  # releases had it directly as `.vma`. A test fails if both go.
  mat = getattr(aval, "mat", None)
  if mat is not None and hasattr(mat, "varying"):
    return frozenset(mat.varying)
  vma = getattr(aval, "vma", None)
  return None if vma is None else frozenset(vma)


def vary(tree: Any, axes: Axes) -> Any:
  """Marks every leaf of ``tree`` as varying over ``axes`` (a no-op where it already is).

  Under ``shard_map``'s type checking (``check_vma=True``, its default),
  autodiff sums the gradient of a replicated input over the axis itself, so a
  device would never see its local gradient and the pmean after it would not
  undo the sum. Differentiating at varying params gives the local gradient
  under ``pmap`` and ``shard_map`` alike.
  """

  def one(x: Any) -> Any:
    varying = varying_axes(x) or frozenset()
    missing = tuple(a for a in axes if a not in varying)
    return jax.lax.pcast(x, missing, to="varying") if missing else x

  return jax.tree.map(one, tree)


def is_spec(x: Any) -> bool:
  return x is None or isinstance(x, PartitionSpec)


def _spec_axes(spec: PartitionSpec | None) -> Axes:
  if spec is None:
    return ()
  axes: list[str] = []
  for entry in spec:
    if entry is None:
      continue
    axes += [entry] if isinstance(entry, str) else list(entry)
  return tuple(axes)


def leaf_axes(param_specs: Any, params: Any) -> list[Axes]:
  """The mesh axes each leaf of ``params`` is split on, from a PartitionSpec tree.

  ``param_specs`` is what ``shard_map``'s ``in_specs`` holds for the params:
  a tree of ``PartitionSpec`` (``None`` for replicated) with the structure of
  ``params`` or a prefix of it.
  """
  paths, treedef = jax.tree_util.tree_flatten_with_path(params)
  try:
    full = jax.tree.broadcast(param_specs, params, is_leaf=is_spec)
    # jaxlib's compiled PyTreeDef has no type stubs.
    specs = treedef.flatten_up_to(full)  # type: ignore[attr-defined]
  except (ValueError, TypeError) as err:
    raise ValueError(
      "sam_value_and_grad: `param_specs` must be a tree of PartitionSpec with the "
      f"structure of the params (or a prefix of it), as in shard_map's in_specs: {err}"
    ) from None
  out = []
  for (path, leaf), spec in zip(paths, specs, strict=True):
    name = jax.tree_util.keystr(path) or "params"
    if not is_spec(spec):
      raise ValueError(
        f"sam_value_and_grad: `param_specs` gives {spec!r} for the parameter {name}; "
        "use a jax.sharding.PartitionSpec (P() for a replicated leaf)."
      )
    if spec is not None and len(spec) > jnp.ndim(leaf):
      raise ValueError(
        f"sam_value_and_grad: `param_specs` gives {spec} for the parameter {name} of "
        f"shape {jnp.shape(leaf)}: more entries than the leaf has dimensions."
      )
    axes = _spec_axes(spec)
    if len(set(axes)) != len(axes):
      raise ValueError(f"sam_value_and_grad: `param_specs` names an axis twice in {spec} ({name}).")
    out.append(axes)
  return out


def _bound(axis: str) -> bool:
  try:
    jax.lax.axis_size(axis)
  except NameError:
    return False
  return True


def manual_axes() -> frozenset[str]:
  """The mesh axes that shard_map or pmap have made manual here (none outside them)."""
  # A test fails if JAX renames `manual_axes`.
  return frozenset(getattr(jax.sharding.get_abstract_mesh(), "manual_axes", ()))


def _types_checked(axes: Axes) -> bool:
  """Whether shard_map tracks varying axes here (``check_vma=True``).

  With ``check_vma=False`` casting to varying is a no-op, so the cast value's
  type still says it is the same on every device.
  """
  marked = jax.lax.pcast(jnp.zeros([]), axes, to="varying")
  return varying_axes(marked) == frozenset(axes)


def check_layout(
  params: Any, axes_per_leaf: list[Axes] | None, data_axes: Axes, per_device: bool
) -> None:
  """Raises a ValueError naming the argument and the leaf where the layout is inconsistent.

  Checks what JAX's types can say reliably: every named axis is a manual axis
  in scope; no manual axis in scope is left unaccounted for (it would average
  or normalise over too little); a split leaf's value does vary over its axes
  and a leaf varies over no axis its spec omits.
  """
  manual = manual_axes()
  for a in data_axes:
    if not _bound(a):
      raise ValueError(
        f"sam_value_and_grad: `axis_name` names {a!r}, which is not a mapped axis here "
        f"(manual axes in scope: {sorted(manual)}). Call the gradient function inside "
        "jax.shard_map or jax.pmap over that axis; under jit with NamedSharding leave "
        "`axis_name` out, jit averages the global batch itself."
      )
  leaf_sets = axes_per_leaf or []
  leaves = jax.tree_util.tree_flatten_with_path(params)[0] if leaf_sets else []
  paths = [jax.tree_util.keystr(p) or "params" for p, _ in leaves]
  for path, axes in zip(paths, leaf_sets, strict=True):
    for a in axes:
      if not _bound(a):
        raise ValueError(
          f"sam_value_and_grad: `param_specs` splits the parameter {path} over {a!r}, "
          f"which is not a mapped axis here (manual axes in scope: {sorted(manual)}). "
          "Use the axis names of the shard_map mesh; under jit with NamedSharding leave "
          "`param_specs` out, jit computes the global norm itself."
        )
      if a in data_axes and per_device:
        raise ValueError(
          f"sam_value_and_grad: perturbation='per_device' cannot be honoured: "
          f"`param_specs` splits the parameter {path} over the data axis {a!r} (FSDP), "
          "so its gradient already adds up every replica's batch and no replica has a "
          "gradient of its own. Use perturbation='global', or keep the parameters "
          "replicated over the data axes."
        )
  split = frozenset(a for axes in leaf_sets for a in axes)
  unaccounted = manual - split - frozenset(data_axes)
  if unaccounted:
    raise ValueError(
      f"sam_value_and_grad: the manual mesh axes {sorted(unaccounted)} are in scope but "
      "neither `axis_name` (the axes that split the batch) nor `param_specs` (the axes "
      "that split parameters) names them, so gradients would not be averaged, or the "
      "norm not summed, over them. Add each to `axis_name` if the batch is split (or "
      "replicated) over it, or pass `param_specs`, the PartitionSpec tree of the params."
    )
  if not split:
    return
  if not _types_checked(tuple(sorted(split))):
    raise ValueError(
      "sam_value_and_grad: `param_specs` splits parameters over "
      f"{sorted(split)}, but shard_map runs with check_vma=False. Without it, autodiff "
      "sums the gradient of a psum over the axis and the gradients of split "
      "parameters are wrong; use check_vma=True (shard_map's default)."
    )
  for path, axes, (_, leaf) in zip(paths, leaf_sets, leaves, strict=True):
    varying = varying_axes(leaf)
    if varying is None:
      continue
    if extra := (varying & manual) - frozenset(axes) - frozenset(data_axes):
      raise ValueError(
        f"sam_value_and_grad: the parameter {path} differs between devices along "
        f"{sorted(extra)}, but `param_specs` splits it over {sorted(axes)}: add those "
        "axes to its PartitionSpec (as in shard_map's in_specs)."
      )
    if missing := frozenset(axes) - varying:
      raise ValueError(
        f"sam_value_and_grad: `param_specs` splits the parameter {path} over "
        f"{sorted(missing)}, but its value is the same on every device along them "
        "(replicated): give it the PartitionSpec it has in shard_map's in_specs."
      )


def average_over_data(tree: Any, data_axes: Axes, axes_per_leaf: list[Axes] | None) -> Any:
  """The mean over the data axes of per-device gradients with the structure of the params.

  A leaf split over a data axis (FSDP inside ``shard_map``: the loss gathers
  it with ``jax.lax.all_gather``) comes out of autodiff already summed over
  that axis, since the transpose of the gather adds every device's
  contribution into the shard. It is divided by the axis size rather than
  averaged again; the other data axes are averaged over as usual.
  """
  if not data_axes:
    return tree
  if axes_per_leaf is None or not any(set(a) & set(data_axes) for a in axes_per_leaf):
    return jax.lax.pmean(tree, data_axes)
  leaves, treedef = jax.tree.flatten(tree)
  out = []
  for g, axes in zip(leaves, axes_per_leaf, strict=True):
    summed = [a for a in data_axes if a in axes]
    rest = tuple(a for a in data_axes if a not in axes)
    if summed:
      g = g / math.prod(jax.lax.axis_size(a) for a in summed)
    out.append(jax.lax.pmean(g, rest) if rest else g)
  return jax.tree.unflatten(treedef, out)


def sum_over_shards(axes_per_leaf: list[Axes]) -> Callable[[list[Any]], jax.Array]:
  """A function from per-leaf squared sums (``None`` for left-out leaves) to the global one.

  Leaves split on the same axes are added first, so there is one psum per
  distinct set of axes, not one per leaf.
  """

  def total(squares: list[Any]) -> jax.Array:
    kept = [s for s in squares if s is not None]
    zero = jnp.zeros([], jnp.result_type(*kept)) if kept else jnp.zeros([])
    groups: dict[Axes, jax.Array] = {}
    for s, axes in zip(squares, axes_per_leaf, strict=True):
      if s is not None:
        groups[axes] = groups.get(axes, zero) + s
    return sum((jax.lax.psum(g, axes) if axes else g for axes, g in groups.items()), zero)

  return total


Perturbation = Literal["global", "per_device"]


@dataclasses.dataclass(frozen=True, eq=False)
class Layout:
  """The data axes and parameter specs of one gradient call, checked, with their operations.

  Built once from ``sam_value_and_grad``'s options by :meth:`create` (which
  checks what can be checked before tracing), then bound to the params of
  each call by :meth:`bind` (which checks them against the mesh in scope).

  Attributes:
    data_axes: the mesh axes that split the batch (``axis_name``).
    per_device: each data replica perturbs with its own gradient
      (``perturbation="per_device"``).
    average_aux: the clean pass's aux is averaged over the data axes.
    param_specs: the ``PartitionSpec`` tree of the params inside ``shard_map``.
    leaf_axes: the mesh axes each parameter leaf is split on, set by
      :meth:`bind`; ``None`` when no parameter is split.
  """

  data_axes: Axes = ()
  per_device: bool = False
  average_aux: bool = False
  param_specs: Any = None
  leaf_axes: tuple[Axes, ...] | None = None

  @classmethod
  def create(
    cls,
    axis_name: str | Sequence[str] | None,
    perturbation: str,
    param_specs: Any,
    *,
    average_aux: bool,
    has_aux: bool,
  ) -> Layout:
    """The layout of ``sam_value_and_grad``'s options, or a ValueError naming the argument."""
    if perturbation not in ("global", "per_device"):
      raise ValueError(
        "sam_value_and_grad: `perturbation` must be 'global' or 'per_device', "
        f"got {perturbation!r}."
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
    return cls(data_axes, perturbation == "per_device", average_aux, param_specs)

  def bind(self, params: Any) -> Layout:
    """This layout for ``params``: each leaf's split axes, checked against the mesh in scope."""
    axes = None if self.param_specs is None else leaf_axes(self.param_specs, params)
    check_layout(params, axes, self.data_axes, self.per_device)
    return dataclasses.replace(self, leaf_axes=None if axes is None else tuple(axes))

  def total(self, squares: list[Any]) -> jax.Array:
    """The whole tree's squared norm from each leaf's local squared sum (``None``: left out)."""
    if self.leaf_axes is None:
      return add(squares)
    return sum_over_shards(list(self.leaf_axes))(squares)

  def norm(self, leaves: Sequence[jax.Array | None]) -> jax.Array:
    """The norm of the whole (unsharded) tree of ``leaves``."""
    return global_norm(leaves, self.total)

  def inner(self, a: Sequence[jax.Array | None], b: Sequence[jax.Array | None]) -> jax.Array:
    """The inner product of the whole (unsharded) trees of leaves ``a`` and ``b``."""
    return global_inner(a, b, self.total)

  def inner_and_norm(
    self, a: Sequence[jax.Array | None], b: Sequence[jax.Array | None]
  ) -> tuple[jax.Array, jax.Array]:
    """``<a, b>`` and ``||b||`` of the whole trees, reading each leaf pair once."""
    return global_inner_and_norm(a, b, self.total)

  def mean(self, tree: Any) -> Any:
    """The mean over the data axes of a per-device value (a loss, a statistic)."""
    return jax.lax.pmean(tree, self.data_axes) if self.data_axes else tree

  def mean_grads(self, grads: Any) -> Any:
    """The global batch's gradient from each device's (see ``average_over_data``)."""
    axes = None if self.leaf_axes is None else list(self.leaf_axes)
    return average_over_data(grads, self.data_axes, axes)

  def vary(self, tree: Any) -> Any:
    """``tree`` marked as differing between data replicas, so autodiff gives local gradients."""
    return vary(tree, self.data_axes) if self.data_axes else tree

  def vary_if_per_device(self, tree: Any) -> Any:
    """``tree`` as varying as the norms of a perturbation: per data replica only per device."""
    return self.vary(tree) if self.per_device else tree

  def sync_aux(self, aux: Any) -> Any:
    """The aux of the clean pass, averaged over the data axes with ``average_aux``."""
    if not self.average_aux:
      return aux

    def one(path: Any, x: Any) -> jax.Array:
      if not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
        raise ValueError(
          "sam_value_and_grad: average_aux=True averages every aux leaf over `axis_name`, "
          f"but the aux leaf at {jax.tree_util.keystr(path)} is {jnp.result_type(x)}, "
          "not floating point; return it as a float or leave average_aux off and reduce "
          "it yourself."
        )
      return jax.lax.pmean(x, self.data_axes)

    return jax.tree_util.tree_map_with_path(one, aux)
