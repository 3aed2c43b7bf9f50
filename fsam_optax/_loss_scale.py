"""Loss scaling for float16: a ``value_and_grad`` that scales the loss, unscales the gradients."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from fsam_optax._perturbation import acc_dtype


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
