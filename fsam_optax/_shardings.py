"""The shardings of an optimizer state, derived from those of the params."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from fsam_optax._buffers import is_differentiated
from fsam_optax._layout import is_spec


def opt_state_shardings(tx: optax.GradientTransformation, params: Any, param_shardings: Any) -> Any:
  """The sharding of every leaf of ``tx.init(params)``, derived from the params'.

  Buffers shaped like the params (the F-SAM moving average, momentum, Adam's
  moments) are laid out like the params; every other leaf (counts,
  hyperparameters) is replicated. ``param_shardings`` is a tree of
  ``PartitionSpec`` (for ``shard_map``'s specs) or of ``NamedSharding`` (for
  ``jit``'s ``out_shardings``, ``jax.device_put`` or an Orbax restore), with
  the structure of ``params`` or a prefix of it; the result holds the same
  kind. ``params`` may be abstract (``jax.ShapeDtypeStruct``).

  Args:
    tx: the optimizer.
    params: the parameters, or their shapes.
    param_shardings: how the parameters are split.

  Returns:
    A tree with the structure of ``tx.init(params)``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, fsam_optax
    >>> from jax.sharding import PartitionSpec as P
    >>> params = {"w": jnp.zeros((4, 2)), "b": jnp.zeros(2)}
    >>> tx = optax.chain(fsam_optax.fsam(), optax.sgd(0.1, momentum=0.9))
    >>> specs = fsam_optax.opt_state_shardings(tx, params, {"w": P("model"), "b": P()})
    >>> tuple(specs[0].ema["w"]), tuple(specs[0].count), tuple(specs[1][0].trace["w"])
    (('model',), (), ('model',))
  """
  state = jax.eval_shape(tx.init, params)
  full = jax.tree.broadcast(param_shardings, params, is_leaf=is_spec)
  leaves = jax.tree.leaves(full, is_leaf=is_spec)
  named = [s for s in leaves if isinstance(s, NamedSharding)]
  replicated = NamedSharding(named[0].mesh, PartitionSpec()) if named else PartitionSpec()
  full = jax.tree.map(lambda s: replicated if s is None else s, full, is_leaf=is_spec)
  leaves, treedef = jax.tree.flatten(params)
  shardings = jax.tree.leaves(full, is_leaf=is_spec)
  kept = [is_differentiated(p) for p in leaves]
  only_kept = lambda xs: jax.tree.unflatten(
    treedef, [x if k else None for x, k in zip(xs, kept, strict=True)]
  )
  # A parameter-shaped node: like the params, or like the methods' buffers, which hold
  # None at the leaves that are not differentiated.
  forms = [(params, full), (only_kept(leaves), only_kept(shardings))]

  # By structure and shapes, not by optax.tree_map_params: that one calls tx.init on a
  # placeholder, which a mask (a tree or a callable of the params) cannot be resolved on.
  def shardings_of(node: Any) -> Any:
    for like, node_shardings in forms:
      structure: Any = jax.tree.structure(node)
      same = structure == jax.tree.structure(like)
      shapes = lambda tree: [jnp.shape(x) for x in jax.tree.leaves(tree)]
      if same and shapes(node) == shapes(like):
        return node_shardings
    return None

  def place(node: Any) -> Any:
    found = shardings_of(node)
    return replicated if found is None else found

  return jax.tree.map(place, state, is_leaf=lambda node: shardings_of(node) is not None)
