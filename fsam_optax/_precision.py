"""Low precision: loss scaling for float16, and what survives rounding of ``theta + e``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def acc_dtype(leaves: list[jax.Array]) -> jnp.dtype:
  """Where norms and products accumulate: at least float32, float64 when a leaf is float64."""
  return jnp.result_type(jnp.float32, *(x.dtype for x in leaves))


def scaled_value_and_grad(fun: Callable[..., Any], has_aux: bool) -> Callable[..., Any]:
  """``jax.value_and_grad(fun)`` with an optional loss scale as first argument.

  With ``loss_scale=None`` it is ``jax.value_and_grad(fun, has_aux)``. Otherwise
  the loss is multiplied by ``loss_scale`` before differentiating, so that small
  float16 gradients do not flush to zero, and the gradients are divided by it
  afterwards (in at least float32). The returned value is the unscaled loss, as
  ``fun`` computed it. ``loss_scale`` may be traced, so it can change between
  steps without recompiling.
  """
  plain = jax.value_and_grad(fun, has_aux=has_aux)

  def scaled_fun(params: Any, loss_scale: jax.Array, *args: Any, **kwargs: Any) -> Any:
    out = fun(params, *args, **kwargs)
    loss = out[0] if has_aux else out
    return loss * jnp.asarray(loss_scale, loss.dtype), out

  scaled = jax.value_and_grad(scaled_fun, has_aux=True)

  def value_and_grad(loss_scale: Any, params: Any, *args: Any, **kwargs: Any) -> Any:
    if loss_scale is None:
      return plain(params, *args, **kwargs)
    (_, out), grads = scaled(params, loss_scale, *args, **kwargs)
    unscale = lambda g: (g.astype(acc_dtype([g])) / loss_scale).astype(g.dtype)
    return out, jax.tree.map(unscale, grads)

  return value_and_grad


def applied_norm(params: Any, perturbed: Any, total: Callable[[list[Any]], jax.Array]) -> jax.Array:
  """``||(theta + e) - theta||`` as stored, in at least float32.

  It is the perturbation that survived rounding ``theta + e`` to the params'
  dtype: for bfloat16 weights near 1 every ``|e_i|`` below 2**-9 rounds away.
  ``total`` adds the per-leaf squared sums (over the shards of split params).
  """
  p_leaves = [jnp.asarray(p) for p in jax.tree.leaves(params)]
  q_leaves = jax.tree.leaves(perturbed)
  acc = acc_dtype(p_leaves)
  sq = [
    jnp.sum(jnp.square(_as_stored(q, acc) - p.astype(acc)))
    for p, q in zip(p_leaves, q_leaves, strict=True)
  ]
  return jnp.sqrt(total(sq).astype(acc))


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
