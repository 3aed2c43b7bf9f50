"""What the gradient function differentiates: a parameter tree, an NNX module or an Equinox module.

The two passes work on a tree of arrays. :func:`bind` turns the gradient
function's first argument into such a tree and says how to call the loss on
it, in each framework's own idiom:

- a parameter tree (a dict, an ``nnx.State``, a Linen ``params``) is
  differentiated whole and handed to the loss as it is;
- an ``nnx.Module`` is split into the Variables the optimizer updates (its
  ``wrt``), its RNG streams, and the rest (BatchNorm statistics, other
  Variables). Each pass runs the loss on a copy of the model; what the clean
  pass writes to the rest, and the RNG streams as the passes leave them, are
  written back to the model afterwards;
- an ``equinox.Module`` has its inexact arrays differentiated and every
  other leaf (functions, strings, integer arrays) passed through, as
  ``eqx.filter_value_and_grad`` does.

Neither Flax nor Equinox is imported here: a module is recognised only if its
framework was already imported by the user.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
from jax.tree_util import keystr

from fsam_optax._buffers import is_differentiated


class Bound(NamedTuple):
  """The gradient function's first argument, as the two passes use it.

  Attributes:
    params: the tree that is differentiated.
    rngs: the RNG streams the loss draws from (an NNX model's), or ``None``.
    rest: the other state the loss reads and writes (an NNX model's other
      Variables), or ``None``.
    call: ``call(params, rngs, rest, *args, **kwargs) -> (fun's output, rngs,
      rest)``, the last two as the call left them.
    write_back: ``write_back(rngs, rest)`` puts them into the user's model
      (NNX); it does nothing for the others.
  """

  params: Any
  rngs: Any
  rest: Any
  call: Callable[..., tuple[Any, Any, Any]]
  write_back: Callable[[Any, Any], None]


def _module_type(module: str, name: str) -> type | None:
  """``module.name`` if the user imported ``module``, else None (nothing is imported here)."""
  return getattr(sys.modules.get(module), name, None)


def is_nnx_module(x: Any) -> bool:
  cls = _module_type("flax.nnx", "Module")
  return cls is not None and isinstance(x, cls)


def is_nnx_optimizer(x: Any) -> bool:
  cls = _module_type("flax.nnx", "Optimizer")
  return cls is not None and isinstance(x, cls)


def is_equinox_module(x: Any) -> bool:
  cls = _module_type("equinox", "Module")
  return cls is not None and isinstance(x, cls)


def bind(fun: Callable[..., Any], first: Any, second: Any) -> Bound:
  """``first`` (params or a model) bound to ``fun``; ``second`` is the opt_state or optimizer."""
  if is_nnx_optimizer(first):
    raise TypeError(
      "sam_value_and_grad: the first argument is an nnx.Optimizer; pass the model "
      "first and the optimizer second: `grad_fn(model, optimizer, *args)`."
    )
  if is_nnx_module(first):
    return _nnx(fun, first, second)
  if is_equinox_module(first):
    return _equinox(fun, first)
  return _tree(fun, first)


def _nothing_to_write(rngs: Any, rest: Any) -> None:
  del rngs, rest


_TAKES_A_MODEL = (
  "If fun takes a model (`fun(model, ...)`), pass the model itself first: an nnx.Module "
  "(with its nnx.Optimizer second) or an equinox.Module."
)
_NNX_TAKES_PARAMS = (
  "If fun takes parameters, pass those first (e.g. `nnx.split(model, nnx.Param, ...)`, "
  "merged back inside fun), or write fun to take the model."
)
_EQX_TAKES_PARAMS = (
  "If fun takes parameters, pass those first (e.g. `eqx.partition(model, "
  "eqx.is_inexact_array)`, combined back inside fun), or write fun to take the model."
)


def _call(fun: Callable[..., Any], first: Any, fix: str, *args: Any, **kwargs: Any) -> Any:
  """``fun(first, *args, **kwargs)``, or a TypeError saying what ``first`` was if fun fails."""
  try:
    return fun(first, *args, **kwargs)
  except TypeError as err:
    # Only the errors of using the first argument as the other kind of thing: a
    # parameter tree called as a model, a model indexed as a parameter tree.
    name = type(first).__name__
    misuse = (f"'{name}' object is not callable", f"'{name}' object is not subscriptable")
    if not any(m in str(err) for m in misuse):
      raise
    raise TypeError(
      f"sam_value_and_grad: fun failed on its first argument, a {name} ({err}). {fix}"
    ) from err


def _tree(fun: Callable[..., Any], params: Any) -> Bound:
  _check_differentiable(params)

  def call(params: Any, rngs: Any, rest: Any, *args: Any, **kwargs: Any) -> Any:
    return _call(fun, params, _TAKES_A_MODEL, *args, **kwargs), rngs, rest

  return Bound(params, None, None, call, _nothing_to_write)


def _check_differentiable(params: Any) -> None:
  """A ValueError naming the first leaf of a plain tree that ``jax.grad`` cannot take."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    if not is_differentiated(leaf):
      what = f"dtype {leaf.dtype}" if hasattr(leaf, "dtype") else type(leaf).__name__
      raise ValueError(
        f"sam_value_and_grad: the params leaf at {keystr(path) or 'the root'} "
        f"({what}) cannot be differentiated: every leaf of a parameter tree must be a "
        "floating-point array. Pass only what is trained (split the model, e.g. "
        "`nnx.split(model, nnx.Param, ...)` or `eqx.partition(model, eqx.is_inexact_array)`), "
        "or pass the whole nnx.Module or equinox.Module, whose other leaves are then "
        "passed through undifferentiated."
      )


def _equinox(fun: Callable[..., Any], model: Any) -> Bound:
  eqx = sys.modules["equinox"]
  params, static = eqx.partition(model, eqx.is_inexact_array)

  def call(params: Any, rngs: Any, rest: Any, *args: Any, **kwargs: Any) -> Any:
    return _call(fun, eqx.combine(params, static), _EQX_TAKES_PARAMS, *args, **kwargs), rngs, rest

  return Bound(params, None, None, call, _nothing_to_write)


def _nnx_wrt(second: Any) -> Any:
  """The Variables an ``nnx.Optimizer`` updates; ``nnx.Param`` beside a bare opt_state."""
  if is_nnx_optimizer(second):
    return second.wrt
  return sys.modules["flax.nnx"].Param


def _check_wrt(params: Any, opt_state: Any, from_optimizer: bool) -> None:
  """ValueErrors for Variables that cannot be differentiated, or an opt_state built for others.

  Beside a bare ``optimizer.opt_state`` the model's ``nnx.Param`` are differentiated; an
  optimizer built with another ``wrt`` keeps its parameter-shaped buffers (its own method's,
  the base optimizer's) for those instead.
  """
  nnx = sys.modules["flax.nnx"]
  paths = lambda tree: [keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    if not is_differentiated(leaf):
      raise ValueError(
        f"sam_value_and_grad: the model's Variable at {keystr(path)} ({leaf.dtype}) is "
        "differentiated, being in the optimizer's `wrt`, but is not floating point. Build "
        "the nnx.Optimizer with a `wrt` that selects only trained Variables (e.g. nnx.Param)."
      )
  is_state = lambda x: isinstance(x, nnx.State)
  if from_optimizer or is_state(opt_state):  # an nnx.State whole is refused by the lookup
    return
  buffers = [x for x in jax.tree.leaves(opt_state, is_leaf=is_state) if is_state(x)]
  # By paths: the optimizer keeps its buffers in Variables of its own type.
  if any(paths(b) != paths(params) for b in buffers):
    raise ValueError(
      "sam_value_and_grad: this opt_state was built for other Variables than the model's "
      "nnx.Param, which are differentiated beside a bare opt_state. If the optimizer was "
      "built with another `wrt`, pass the nnx.Optimizer itself: "
      "`grad_fn(model, optimizer, ...)`."
    )


def _nnx(fun: Callable[..., Any], model: Any, second: Any) -> Bound:
  nnx = sys.modules["flax.nnx"]
  wrt = _nnx_wrt(second)
  graphdef, params, rngs, rest = nnx.split(model, wrt, nnx.RngState, ...)
  _check_wrt(params, second, from_optimizer=is_nnx_optimizer(second))

  def call(params: Any, rngs: Any, rest: Any, *args: Any, **kwargs: Any) -> Any:
    # A copy: the pass runs inside jax.value_and_grad, where the model's own
    # Variables (from the caller's trace) cannot be written.
    copy = nnx.merge(graphdef, params, rngs, rest, copy=True)
    out = _call(fun, copy, _NNX_TAKES_PARAMS, *args, **kwargs)
    _, _, rngs, rest = nnx.split(copy, wrt, nnx.RngState, ...)
    return out, rngs, rest

  write_back = lambda rngs, rest: nnx.update(model, rngs, rest)
  return Bound(params, rngs, rest, call, write_back)
