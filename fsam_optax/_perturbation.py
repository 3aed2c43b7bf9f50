"""The perturbation maths, as pure functions of lists of leaves.

One SAM-family step perturbs the weights ``theta`` along a direction ``d``
(the clean gradient for SAM, ``g - sigma m`` for F-SAM) scaled to the radius
``rho``::

  n = ||d||                      (of |theta| d in adaptive mode)
  e = rho d / (n + eps)          (rho theta^2 d / (n + eps) in adaptive mode)

and takes the gradient again at ``theta + e``. Every function here works on
flat lists of leaves; ``None`` stands for a leaf left out (masked). Norms are
of the whole tree: ``total`` maps the per-leaf squared sums to the squared
norm, adding them over the devices that hold the shards of split parameters
(see :class:`fsam_optax._layout.Layout`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

Total = Callable[[list[Any]], jax.Array]


def acc_dtype(leaves: Sequence[jax.Array]) -> jnp.dtype:
  """Where norms and products accumulate: at least float32, float64 when a leaf is float64."""
  return jnp.result_type(jnp.float32, *(x.dtype for x in leaves))


def add(squares: list[Any]) -> jax.Array:
  """The squared norm of unsharded leaves: the sum of their squared sums (``None`` skipped)."""
  kept = [s for s in squares if s is not None]
  return sum(kept[1:], kept[0]) if kept else jnp.zeros([])


def global_norm(
  leaves: Sequence[jax.Array | None], total: Total = add, dtype: jnp.dtype | None = None
) -> jax.Array:
  """The norm of the whole tree of ``leaves`` (``None`` leaves left out).

  It is computed in ``dtype``, by default the leaves' ``acc_dtype``.

  Example:
    >>> import jax.numpy as jnp
    >>> from fsam_optax._perturbation import global_norm
    >>> float(global_norm([jnp.array([3.0]), None, jnp.array([4.0])]))
    5.0
  """
  acc = dtype or acc_dtype([x for x in leaves if x is not None])
  squares = [None if x is None else jnp.sum(jnp.square(x.astype(acc))) for x in leaves]
  return jnp.sqrt(total(squares).astype(acc))


def global_inner(
  a: Sequence[jax.Array | None], b: Sequence[jax.Array | None], total: Total = add
) -> jax.Array:
  """The inner product ``<a, b>`` of two whole trees, leaf by leaf (``None`` leaves left out).

  It is computed in the leaves' ``acc_dtype``; ``total`` adds the per-leaf
  sums as it adds squared sums for :func:`global_norm`.

  Example:
    >>> import jax.numpy as jnp
    >>> from fsam_optax._perturbation import global_inner
    >>> float(global_inner([jnp.array([1.0, 2.0]), None], [jnp.array([3.0, 4.0]), None]))
    11.0
  """
  pairs = [(x, y) for x, y in zip(a, b, strict=True) if x is not None and y is not None]
  acc = acc_dtype([x for pair in pairs for x in pair])
  products = [
    None if x is None or y is None else jnp.sum(x.astype(acc) * y.astype(acc))
    for x, y in zip(a, b, strict=True)
  ]
  return total(products).astype(acc)


def global_inner_and_norm(
  a: Sequence[jax.Array | None], b: Sequence[jax.Array | None], total: Total = add
) -> tuple[jax.Array, jax.Array]:
  """``<a, b>`` and ``||b||`` of two whole trees, from one reduction per leaf pair.

  One variadic reduction computes both sums of a leaf, so ``b`` is read once
  for the two (two separate sums read it twice on XLA:CPU).

  Example:
    >>> import jax.numpy as jnp
    >>> from fsam_optax._perturbation import global_inner_and_norm
    >>> dot, norm = global_inner_and_norm([jnp.array([1.0, 2.0])], [jnp.array([3.0, 4.0])])
    >>> float(dot), float(norm)
    (11.0, 5.0)
  """
  pairs = [(x, y) for x, y in zip(a, b, strict=True) if x is not None and y is not None]
  acc = acc_dtype([x for pair in pairs for x in pair])
  zero = jnp.zeros([], acc)

  def sums(x: jax.Array, y: jax.Array) -> jax.Array:
    x, y = x.astype(acc), y.astype(acc)
    both = jax.lax.reduce(
      (x * y, y * y), (zero, zero), lambda u, v: (u[0] + v[0], u[1] + v[1]), tuple(range(x.ndim))
    )
    return jnp.stack(both)

  leaves = [None if x is None or y is None else sums(x, y) for x, y in zip(a, b, strict=True)]
  dot, square = total(leaves).astype(acc) if pairs else (zero, zero)
  return dot, jnp.sqrt(square)


def clip_by_global_norm(tree: Any, max_norm: float, total: Total = add) -> Any:
  """``optax.clip_by_global_norm``'s rule, with the norm of the whole (possibly sharded) tree."""
  norm = global_norm(jax.tree.leaves(tree), total)
  return jax.tree.map(
    lambda g: jnp.where(norm < max_norm, g, (g / norm.astype(g.dtype)) * max_norm), tree
  )


def perturbation(
  params: list[jax.Array],
  for_norm: list[jax.Array],
  for_step: list[jax.Array],
  rho: jax.Array,
  eps: jax.Array,
  *,
  adaptive: bool,
  mask: Sequence[bool],
  total: Total = add,
  norm: jax.Array | None = None,
) -> tuple[list[jax.Array | None], jax.Array]:
  """The leaves of ``e`` (``None`` where ``mask`` is False) and the direction's norm ``n``.

  ``for_norm`` and ``for_step`` hold the same direction ``d``, possibly spelt
  apart (see ``FSAMState``): the first feeds the norm, the second the step.
  ``norm``, if given, replaces ``||d||`` (a method's own norm).

  Example:
    >>> import jax.numpy as jnp
    >>> from fsam_optax._perturbation import perturbation
    >>> d = [jnp.array([3.0, 4.0])]
    >>> e, n = perturbation([jnp.zeros(2)], d, d, jnp.float32(1.0),
    ...                     jnp.float32(0.0), adaptive=False, mask=[True])
    >>> e[0].tolist(), float(n)
    ([0.6000000238418579, 0.800000011920929], 5.0)
  """
  acc = acc_dtype(params)

  def weighted(p: jax.Array, d: jax.Array, power: int) -> jax.Array:
    # |theta|**power * d in `acc`, not in the params' dtype: in float16 the
    # product overflows to inf (and e to NaN) already for |theta|, |d| ~ 300.
    d = d.astype(acc)
    return jnp.abs(p).astype(acc) ** power * d if adaptive else d

  if norm is None:
    kept = zip(params, for_norm, mask, strict=True)
    norm = global_norm([weighted(p, d, 1) if keep else None for p, d, keep in kept], total, acc)
  norm = norm.astype(acc)
  scale = rho.astype(acc) / (norm + eps.astype(acc))
  kept = zip(params, for_step, mask, strict=True)
  e = [(scale * weighted(p, d, 2)).astype(p.dtype) if keep else None for p, d, keep in kept]
  return e, norm


def shifted(params: list[jax.Array], e: list[jax.Array | None]) -> list[jax.Array]:
  """``theta + e``, leaf by leaf (``theta`` where ``e`` is ``None``)."""
  return [p if x is None else p + x for p, x in zip(params, e, strict=True)]


def applied_norm(
  params: list[jax.Array], perturbed: list[jax.Array], total: Total = add
) -> jax.Array:
  """``||(theta + e) - theta||`` as stored, in at least float32.

  It is the perturbation that survived rounding ``theta + e`` to the params'
  dtype: for bfloat16 weights near 1 every ``|e_i|`` below 2**-9 rounds away.
  """
  acc = acc_dtype(params)
  return global_norm(
    [_as_stored(q, acc) - p.astype(acc) for p, q in zip(params, perturbed, strict=True)], total
  )


def _as_stored(x: jax.Array, acc: jnp.dtype) -> jax.Array:
  """``x`` in ``acc`` with the value its own dtype holds.

  Inside a jit, XLA may keep a narrow result in wider precision when the
  consumer is wider (``xla_allow_excess_precision``); the explicit rounding
  measures what a stored array of the params' dtype holds.
  """
  wide = x.astype(acc)
  if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == acc:
    return wide
  info = jnp.finfo(x.dtype)
  return jax.lax.reduce_precision(wide, exponent_bits=info.nexp, mantissa_bits=info.nmant)
