"""``optax.chain`` with a place for the term a method adds after the base optimizer."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from fsam_optax._lookup import find_sam_state
from fsam_optax._method import method_name
from fsam_optax._pairs import SAMGrad


def chain(
  method: optax.GradientTransformation, *base: optax.GradientTransformation
) -> optax.GradientTransformationExtraArgs:
  """``optax.chain(method, *base)``, plus the term ``method`` adds after ``base``'s update.

  A method whose :meth:`~fsam_optax.SAMState.combine` fills
  :attr:`SAMGrad.after_base` (WSAM's decoupled form, say) adds that term to
  the update the base optimizer makes, past its momentum, weight decay and
  preconditioning (finished by the state's
  :meth:`~fsam_optax.SAMState.terms_at_update`, if it has one);
  ``optax.chain`` has no place for it and the method refuses it. On a step
  the method leaves out (``skip_nonfinite``), no term is added; after
  ``optax.MultiSteps`` or ``optax.apply_every``, which hold the base update
  back for ``k`` steps, a term is refused (accumulate with ``micro_batches=``).
  For every other method this is ``optax.chain``. The state is
  ``optax.chain``'s.

  Args:
    method: the SAM-family transformation, first.
    *base: the transformations after it.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax.numpy as jnp, optax, fsam_optax
    >>> tx = fsam_optax.chain(fsam_optax.fsam(rho=0.1), optax.sgd(0.1))
    >>> opt_state = tx.init({"w": jnp.ones(2)})
    >>> type(opt_state[0]).__name__
    'FSAMState'
  """
  inner = optax.chain(method, *base)

  def update_fn(
    updates: optax.Updates, state: Any, params: optax.Params | None = None, **extra_args: Any
  ) -> tuple[optax.Updates, Any]:
    is_samgrad = lambda x: isinstance(x, SAMGrad)
    leaves, treedef = jax.tree.flatten(updates, is_leaf=is_samgrad)
    if not all(is_samgrad(x) for x in leaves):
      return inner.update(updates, state, params, **extra_args)  # the method says what to do
    terms = [x.after_base for x in leaves]
    stripped = jax.tree.unflatten(treedef, [x._replace(after_base=None) for x in leaves])
    if any(t is not None for t in terms) and _holds_back(state):
      raise ValueError(
        f"{method_name(find_sam_state(state).state)} adds a term after the base "
        "optimizer's update, which would be applied on every step while optax.MultiSteps "
        "or optax.apply_every holds the base update back for k steps: accumulate inside "
        "the gradient function instead, with sam_value_and_grad(..., micro_batches=k)."
      )
    out, new_state = inner.update(stripped, state, params, **extra_args)
    if all(t is None for t in terms):
      return out, new_state
    # No term on a step the method left out: its count did not advance.
    found = find_sam_state(new_state)
    taken = found.step_count != find_sam_state(state).step_count
    at_update = getattr(found.state, "terms_at_update", None)
    if at_update is not None:
      terms = at_update(terms)
    plain, out_def = jax.tree.flatten(out)
    added = [
      u if t is None else u + jnp.where(taken, t, 0).astype(u.dtype)
      for u, t in zip(plain, terms, strict=True)
    ]
    return jax.tree.unflatten(out_def, added), new_state

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def _holds_back(state: Any) -> bool:
  """Whether ``state`` has a transformation that holds updates back for several steps."""
  is_held = lambda x: isinstance(x, optax.MultiStepsState | optax.ApplyEvery)
  return any(is_held(x) for x in jax.tree.leaves(state, is_leaf=is_held))
