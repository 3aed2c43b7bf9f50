"""Finds the SAM-family state inside a (possibly nested) optimizer state.

The gradient helper reads the perturbation's settings from the state of the
transformation at the front of the chain: a state whose type
:func:`fsam_optax.method_transformation` registered.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fsam_optax._method import STATE_TYPES, method_name

_HOW_TO_BUILD = (
  "Build the optimizer as `optax.chain(fsam_optax.fsam(...), base_optimizer)` "
  "(or with `fsam_optax.sam`, `gsam`, `vasso`, `looksam` first; "
  "`fsam_optax.chain(fsam_optax.wsam(...), base_optimizer)` for WSAM) and pass the state "
  "that its init/update return."
)


# inject_hyperparams returns the stateful variant's state in recent optax.
_INJECT_STATES = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)


def _scalar(x: Any) -> jax.Array:
  # Unwraps Flax NNX variables (nnx.Optimizer keeps its state in them).
  return jnp.asarray(jax.tree.leaves(x)[0])


class Found(NamedTuple):
  """The SAM-family state and, under ``inject_hyperparams``, its live hyperparameters."""

  state: Any
  hyperparams: Mapping[str, Any] | None

  def hyperparam(self, name: str) -> jax.Array:
    """The state's scalar ``name``, as the user set it last.

    Under ``inject_hyperparams`` the dict holds the values the user set last;
    the inner state only learns them at the next update.
    """
    value = getattr(self.state, name, None)
    if value is None or name in ("count", "config"):
      fields = [f for f in self.state._fields if f not in ("count", "config")]
      raise ValueError(
        f"{method_name(self.state)}: `step.hyperparam({name!r})` names no scalar of the "
        f"state; it has {fields}."
      )
    if self.hyperparams is not None and name in self.hyperparams:
      value = jnp.asarray(_scalar(self.hyperparams[name]), dtype=_scalar(value).dtype)
    return _scalar(value)

  @property
  def step_count(self) -> jax.Array:
    """The state's count: the number of updates applied so far."""
    return _scalar(self.state.count)


class _Hit(NamedTuple):
  state: Any
  hyperparams: Mapping[str, Any] | None
  problem: str | None


def _not_first(where: str) -> str:
  where = where.replace("{", "{{").replace("}", "}}")  # the message is formatted later
  return (
    "{method} must be the first transformation of the chain, because the "
    "transformations before it would receive the helper's SAMGrad tree; "
    f"found it at {where}. Move it to the front: "
    "`{chain}({factory}(...), ...)`."
  )


_INSIDE_APPLY_IF_FINITE = (
  "{method} cannot sit inside optax.apply_if_finite: on a skipped step it returns "
  "zeros shaped like the SAMGrad tree it received, which the rest "
  "of the chain cannot take. Wrap the base optimizer instead: "
  "`{chain}({factory}(...), optax.apply_if_finite(base, "
  "max_consecutive_errors))` with `{method}(..., skip_nonfinite=True)`, which "
  "leaves its state unchanged on a non-finite step, so the whole step is skipped."
)

_APPLY_IF_FINITE_NEEDS_SKIP = (
  "optax.apply_if_finite after {method} skips the base optimizer on a non-finite "
  "step, but {method} would still {consequence}. Build it with "
  "`{factory}(..., skip_nonfinite=True)`, which leaves its state unchanged "
  "on such a step."
)


def _non_finite_consequence(state: Any) -> str:
  """What ``state`` does with a non-finite step that the base optimizer skips."""
  follow = "`rho`'s schedule follows"
  if state.config.every != 1 or state.config.probability != 1:
    follow = "`rho`'s schedule and the choice of SAM steps follow"
  ahead = f"so that its step count, which {follow}, runs ahead of the base optimizer's"
  buffer = state.config.buffer
  if buffer is None or getattr(state, buffer, None) is None:
    return f"count that step, {ahead}"
  return (
    f"store that step's non-finite values in its `{buffer}` (which they never leave), "
    f"and count it, {ahead}"
  )


_INSIDE_MASK = (
  "{method} cannot sit inside optax.masked or optax.multi_transform: the gradient "
  "helper perturbs every parameter with one global norm. Keep {method} first and "
  "unmasked, exclude parameters from the perturbation with its own `mask=`, "
  "and mask the base optimizer after it: `{chain}({factory}(mask=...), "
  "optax.multi_transform(transforms, labels))`."
)


_BUILT_IN = ("fsam", "sam", "gsam", "vasso", "looksam", "wsam")


def _children(node: Any) -> list[tuple[Any, str | None]]:
  """One level of a pytree, each child with the placement problem it implies."""
  if isinstance(node, optax.ApplyIfFiniteState):
    return [(node.inner_state, _INSIDE_APPLY_IF_FINITE)]
  if isinstance(node, optax.MaskedState | optax.MultiTransformState):
    return [(c, _INSIDE_MASK) for c in jax.tree.leaves(node, is_leaf=lambda x: x is not node)]
  if isinstance(node, optax.MultiStepsState):
    problem = (
      "{method} cannot sit inside optax.MultiSteps, which accumulates plain gradients. {accumulate}"
    )
    return [(c, problem) for c in node]
  if type(node) in (tuple, list):  # an optax.chain state
    return [(c, _not_first(f"position {i}") if i else None) for i, c in enumerate(node)]
  if isinstance(node, dict):  # an optax.named_chain state, in insertion order
    items = enumerate(node.items())
    return [(c, _not_first(f"entry {k!r}") if i else None) for i, (k, c) in items]
  leaves = jax.tree.leaves(node, is_leaf=lambda x: x is not node)
  # Identity, not ==: a wrapper such as an NNX OptVariable would compare
  # elementwise with the array it holds.
  is_leaf = len(leaves) == 1 and leaves[0] is node
  return [] if is_leaf else [(c, None) for c in leaves]


def _search(node: Any, hyperparams: Any, problem: str | None) -> list[_Hit]:
  if isinstance(node, tuple(STATE_TYPES)):
    return [_Hit(node, hyperparams, problem)]
  if isinstance(node, _INJECT_STATES):
    return _search(node.inner_state, node.hyperparams, problem)
  hits = []
  for child, child_problem in _children(node):
    hits += _search(child, None, problem or child_problem)
  return hits


def find_sam_state(opt_state: Any, caller: str = "sam_value_and_grad") -> Found:
  """Returns the one SAM-family state in ``opt_state``, or raises a helpful error.

  ``caller`` names the public function in the errors.
  """
  hits = _search(opt_state, None, None)
  if not hits:
    raise ValueError(_no_state(opt_state, caller))
  if len(hits) > 1:
    names = ", ".join(method_name(hit.state) for hit in hits)
    raise ValueError(
      f"{caller}: opt_state holds {len(hits)} SAM-family states ({names}); a "
      "chain must contain exactly one SAM-family transformation (fsam, sam, gsam, "
      "vasso, looksam, wsam or a method of one's own)."
    )
  hit = hits[0]
  method = method_name(hit.state)
  # The built-in methods' factories are fsam_optax's; a method of one's own, its author's.
  factory = f"fsam_optax.{method}" if method in _BUILT_IN else method
  # WSAM's decoupled term needs fsam_optax.chain, and no accumulation after it.
  chain = "fsam_optax.chain" if method == "wsam" else "optax.chain"
  accumulate = (
    "Accumulate inside the gradient function instead: `sam_value_and_grad(..., micro_batches=k)`."
    if method == "wsam"
    else f"Accumulate after it instead: `{chain}({factory}(...), "
    "optax.MultiSteps(base, every_k_schedule=k).gradient_transformation())`."
  )
  if hit.problem is not None:
    raise ValueError(
      hit.problem.format(method=method, factory=factory, chain=chain, accumulate=accumulate)
    )
  if not hit.state.config.skip_nonfinite and _has_apply_if_finite(opt_state):
    consequence = _non_finite_consequence(hit.state)
    raise ValueError(
      _APPLY_IF_FINITE_NEEDS_SKIP.format(
        method=method, factory=factory, chain=chain, consequence=consequence
      )
    )
  return Found(hit.state, hit.hyperparams)


def _no_state(opt_state: Any, caller: str) -> str:
  """The error for an ``opt_state`` with no SAM-family state: what it is, and what to pass."""
  got = f"opt_state (of type `{_type_name(opt_state)}`)"
  if _is_nnx_state(opt_state):
    return (
      f"{caller}: {got} holds no SAM-family state (fsam, sam, gsam, vasso, "
      "looksam or wsam): an `nnx.State`, such as `nnx.state(optimizer)` returns, keeps the "
      "optimizer's arrays as nested dicts of variables, without the optax state that the "
      "SAM-family transformation reads its settings from. Pass the `nnx.Optimizer` itself "
      "or `optimizer.opt_state`."
    )
  return (
    f"{caller}: {got} holds no SAM-family state (fsam, sam, gsam, vasso, "
    f"looksam or wsam). {_HOW_TO_BUILD}"
  )


def _is_nnx_state(x: Any) -> bool:
  """Whether ``x`` is a ``flax.nnx.State`` (without importing Flax: only if it is loaded)."""
  nnx = sys.modules.get("flax.nnx")
  state_type = getattr(nnx, "State", None)
  return isinstance(state_type, type) and isinstance(x, state_type)


def _type_name(x: Any) -> str:
  """``x``'s type as its package exports it: ``tuple``, ``optax.ScaleByAdamState``."""
  cls = type(x)
  if cls.__module__ == "builtins":
    return cls.__qualname__
  package = cls.__module__.split(".")[0]
  for prefix in (package, "flax.nnx"):
    if getattr(sys.modules.get(prefix), cls.__qualname__, None) is cls:
      return f"{prefix}.{cls.__qualname__}"
  return f"{cls.__module__}.{cls.__qualname__}"


def _has_apply_if_finite(opt_state: Any) -> bool:
  is_guard = lambda x: isinstance(x, optax.ApplyIfFiniteState)
  return any(is_guard(x) for x in jax.tree.leaves(opt_state, is_leaf=is_guard))
