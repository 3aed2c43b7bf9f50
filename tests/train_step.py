"""The jitted training step most tests run: the helper's gradient pairs, ``tx.update``, apply."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

import fsam_optax


def sam_step(
  tx: optax.GradientTransformation, loss_fn: Callable[..., Any], **grad_kwargs: Any
) -> Callable[..., tuple[Any, Any]]:
  """``jax.jit`` of ``(params, opt_state, *batch) -> (params, opt_state)``, one step of ``tx``.

  ``grad_kwargs`` go to :func:`fsam_optax.sam_value_and_grad`.
  """
  grad_fn = fsam_optax.sam_value_and_grad(loss_fn, **grad_kwargs)

  @jax.jit
  def step(params: Any, opt_state: Any, *batch: Any) -> tuple[Any, Any]:
    _, grads = grad_fn(params, opt_state, *batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return step
