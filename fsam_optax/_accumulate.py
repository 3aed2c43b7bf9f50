"""A loss's value and gradient on a large batch, one micro-batch at a time.

SAM on a batch too large for memory needs the clean gradient of the whole
batch before it can perturb, and the perturbed gradient of the same batch
after: each pass is a ``lax.scan`` over micro-batches that adds up the
gradients, so only one micro-batch's activations are alive at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from fsam_optax._layout import vary, varying_axes


def split(micro_batches: int, args: Any) -> Any:
  """Every array in ``args`` reshaped to ``(micro_batches, batch // micro_batches, ...)``."""

  def one(path: Any, x: Any) -> jax.Array:
    shape = jnp.shape(x)
    if not shape or shape[0] % micro_batches:
      # `path` starts in the (args, kwargs) pair.
      kind = "positional argument" if path[0].idx == 0 else "keyword argument"
      where = f"{kind} {jax.tree_util.keystr(path[1:])}"
      raise ValueError(
        f"sam_value_and_grad: micro_batches={micro_batches} splits every argument after "
        f"opt_state along its first axis, but the {where} has shape {shape}, "
        f"whose first axis is not a multiple of {micro_batches}. Close over (or "
        "functools.partial in) arguments that are not batched."
      )
    return jnp.reshape(x, (micro_batches, shape[0] // micro_batches, *shape[1:]))

  return jax.tree_util.tree_map_with_path(one, args)


def _zeros_like(struct: jax.ShapeDtypeStruct) -> jax.Array:
  # Sums are kept in at least float32, so bfloat16 gradients lose nothing to
  # the addition. A scan carry must keep its type, including the mesh axes it
  # varies over inside shard_map, which the loss's outputs have and zeros lack.
  zeros = jnp.zeros(struct.shape, jnp.result_type(struct.dtype, jnp.float32))
  return vary(zeros, tuple(sorted(varying_axes(struct) or ())))


def accumulated(value_and_grad: Callable[..., Any], micro_batches: int) -> Callable[..., Any]:
  """``value_and_grad`` on the mean loss over ``micro_batches`` equal slices of the batch.

  ``value_and_grad(params, rngs, rest, *args, **kwargs)`` returns ``((value,
  (aux, rngs, rest)), grads)``. For a loss that is a mean over examples the
  result is the gradient of the whole batch. The value and gradient are the
  means over micro-batches; an aux is stacked along a new leading axis of
  length ``micro_batches``; ``rngs`` and ``rest`` (an NNX model's RNG streams
  and other Variables) go through the micro-batches one after another, as if
  they ran through the model in turn.
  """

  def run(params: Any, rngs: Any, rest: Any, *args: Any, **kwargs: Any) -> Any:
    batches = split(micro_batches, (args, kwargs))
    one = lambda rngs, rest, batch: value_and_grad(params, rngs, rest, *batch[0], **batch[1])
    first = jax.tree.map(lambda x: x[0], batches)
    (value_s, (_, *state_s)), grads_s = jax.eval_shape(one, rngs, rest, first)
    _check_state_kept((rngs, rest), tuple(state_s))

    def step(carry: Any, batch: Any) -> Any:
      total_value, total_grads, rngs, rest = carry
      (value, (aux, rngs, rest)), grads = one(rngs, rest, batch)
      add = lambda total, x: total + x.astype(total.dtype)
      return (add(total_value, value), jax.tree.map(add, total_grads, grads), rngs, rest), aux

    init = (_zeros_like(value_s), jax.tree.map(_zeros_like, grads_s), rngs, rest)
    (value, grads, rngs, rest), aux = jax.lax.scan(step, init, batches)
    mean = lambda total, like: (total / micro_batches).astype(like.dtype)
    return (mean(value, value_s), (aux, rngs, rest)), jax.tree.map(mean, grads, grads_s)

  return run


def _check_state_kept(before: Any, after: Any) -> None:
  """A ValueError unless one micro-batch leaves the model's Variables of the same types."""
  shape = lambda tree: (
    jax.tree.structure(tree),
    [(jnp.shape(x), jnp.result_type(x)) for x in jax.tree.leaves(tree)],
  )
  if shape(before) != shape(after):
    raise ValueError(
      "sam_value_and_grad: with micro_batches, the model's Variables go from one "
      "micro-batch to the next, but the loss changes their structure, shapes or dtypes "
      "(it creates a Variable, or a statistic changes dtype). Leave micro_batches off, "
      "or create every Variable in the model's __init__, with the dtype it keeps."
    )
