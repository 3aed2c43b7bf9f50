"""The state's parameter-shaped buffers: one for each leaf that is differentiated.

A model may hold leaves the gradient function does not differentiate (an
Equinox module's integer arrays, say, which ``eqx.filter(model, eqx.is_array)``
hands to ``tx.init``). The buffers and the mask skip them (``None`` in their
place), so they line up with the gradients, which have no entry there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def is_differentiated(leaf: Any) -> bool:
  """Whether the gradient function differentiates this parameter leaf (an inexact number)."""
  if isinstance(leaf, float | complex):
    return True
  dtype = getattr(leaf, "dtype", None)
  return dtype is not None and jnp.issubdtype(dtype, jnp.inexact)


def zeros_buffer(params: Any, dtype: jnp.dtype | None) -> Any:
  """A buffer of zeros for each differentiated leaf of ``params``, ``None`` elsewhere.

  Its dtype is ``dtype``, or by default float32 for leaves narrower than float32
  (whose rounding would swallow small increments) and the leaf's otherwise.
  """
  return param_buffer(params, lambda p: _zeros_for(p, dtype))


def param_buffer(params: Any, make: Callable[[Any], Any]) -> Any:
  """``make(leaf)`` for each differentiated leaf of ``params``, ``None`` elsewhere."""
  return jax.tree.map(lambda p: make(p) if is_differentiated(p) else None, params)


def _zeros_for(param: Any, dtype: jnp.dtype | None) -> jax.Array:
  param = jnp.asarray(param)
  if dtype is None:
    dtype = param.dtype
    if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32:
      dtype = jnp.dtype(jnp.float32)
  return jnp.zeros(param.shape, dtype)
