"""What the gradient helper returns and the method's update consumes: a ``SAMGrad`` a leaf.

:func:`fsam_optax.sam_value_and_grad` returns, at each leaf of the params, a
:class:`SAMGrad` holding the gradient the rest of the chain receives and the
new value of the method's buffer; the SAM-family transformation at the front
of the chain hands the gradients on and stores the buffer.
"""

from __future__ import annotations

from typing import Any, NamedTuple, NoReturn

import jax


class SAMGrad(NamedTuple):
  """What :func:`sam_value_and_grad` returns at each parameter leaf, for the method's update.

  Attributes:
    grad: the gradient the optimizers after the method in the chain receive:
      ``g'``, the gradient at the perturbed weights ``theta + e`` (SAM, F-SAM,
      VaSSO, LookSAM's two-pass steps), GSAM's combination of ``g`` and ``g'``,
      WSAM's ``g`` (decoupled) or combination, LookSAM's reused gradient on its
      one-pass steps, ``g`` on the other methods' one-pass steps.
    buffer: the new value of the method's parameter-shaped buffer at this leaf,
      which its update stores (F-SAM's and VaSSO's moving averages, LookSAM's
      ``g_v``); ``None`` for a method without one.
    after_base: a term added to the update after the base optimizer's, past
      its momentum, weight decay and preconditioning (by
      :func:`fsam_optax.chain`); ``None`` for the methods that add none.
  """

  grad: jax.Array
  buffer: jax.Array | None = None
  after_base: jax.Array | None = None

  # Arithmetic on a SAMGrad would silently stack the two gradients into one
  # array (jnp treats a tuple as a sequence), or repeat or concatenate the
  # tuple: refuse it with what to do.
  def __jax_array__(self, *args: Any, **kwargs: Any) -> NoReturn:
    raise TypeError(_PAIR_AS_ARRAY)

  def __array__(self, *args: Any, **kwargs: Any) -> NoReturn:
    raise TypeError(_PAIR_AS_ARRAY)

  def __add__(self, other: Any) -> NoReturn:
    raise TypeError(_PAIR_AS_ARRAY)

  def __radd__(self, other: Any) -> NoReturn:
    raise TypeError(_PAIR_AS_ARRAY)

  def __mul__(self, other: Any) -> NoReturn:
    raise TypeError(_PAIR_AS_ARRAY)

  def __rmul__(self, other: Any) -> NoReturn:
    raise TypeError(_PAIR_AS_ARRAY)


_PAIR_AS_ARRAY = (
  "a fsam_optax.SAMGrad was used as an array. Pass the helper's gradients unchanged "
  "to an optimizer whose chain starts with the SAM-family transformation (fsam, sam, "
  "gsam, vasso, looksam, wsam or a method of your own), or take the plain tree of gradients "
  "that the base optimizer receives with fsam_optax.base_grads(grads)."
)


def split_grads(
  updates: Any, method: str, *, terms: bool = False
) -> tuple[list[jax.Array], list[Any], Any]:
  """The helper's gradients: lists of their ``grad`` and ``buffer`` leaves, and a treedef.

  Unless ``terms``, a term to add after the base optimizer must have been taken
  out already, by :func:`fsam_optax.chain`: ``optax.chain`` has no place for it.

  ``method`` names the transformation in the error raised for plain gradients.
  """
  is_samgrad = lambda x: isinstance(x, SAMGrad)
  leaves, treedef = jax.tree.flatten(updates, is_leaf=is_samgrad)
  if not all(is_samgrad(x) for x in leaves):
    raise ValueError(
      f"{method} received plain gradients. Compute them with "
      "`fsam_optax.sam_value_and_grad(loss_fn)(params, opt_state, ...)`, "
      f"which returns the SAMGrad tree that {method} consumes, "
      f"and place {method} first in the chain."
    )
  if not terms and any(x.after_base is not None for x in leaves):
    raise ValueError(
      f"{method} adds a term to the update after the base optimizer's, which optax.chain "
      f"has no place for: build the optimizer with fsam_optax.chain({method}(...), base) "
      "instead of optax.chain."
    )
  return [x.grad for x in leaves], [x.buffer for x in leaves], treedef


def base_grads(grads: Any) -> Any:
  """The gradients the optimizers after the method receive, as a plain tree.

  ``g'`` for SAM, F-SAM and VaSSO; GSAM's combination; LookSAM's reused
  gradient on its one-pass steps; WSAM's ``g`` (decoupled: the term it adds after
  the base optimizer is left out) or combination; ``g`` on the other methods'
  one-pass steps. Use
  it (not the ``SAMGrad`` tree) wherever a plain gradient tree is expected,
  e.g. ``optax.global_norm``.

  Example:
    >>> import jax.numpy as jnp, optax, fsam_optax
    >>> params = {"w": jnp.array([3.0, 4.0])}
    >>> tx = optax.chain(fsam_optax.fsam(rho=0.1), optax.sgd(0.1))
    >>> grad_fn = fsam_optax.sam_value_and_grad(lambda p: jnp.sum(p["w"] ** 2) / 2)
    >>> _, grads = grad_fn(params, tx.init(params))
    >>> print(fsam_optax.base_grads(grads)["w"])
    [3.06 4.08]
  """
  try:
    leaves, _, treedef = split_grads(grads, "fsam_optax.base_grads", terms=True)
  except ValueError:
    raise ValueError(
      "fsam_optax.base_grads: expected the gradients of sam_value_and_grad, a tree "
      "with a SAMGrad at each leaf."
    ) from None
  return jax.tree.unflatten(treedef, leaves)
