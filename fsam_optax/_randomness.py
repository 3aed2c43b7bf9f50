"""Which random key each of the two passes receives."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax

SecondPassRng = Literal["fresh", "same"]

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_BOTH = inspect.Parameter.POSITIONAL_OR_KEYWORD  # by keyword or positionally
_VARIADIC = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


class RngArg(NamedTuple):
  """Where a call of ``fun`` holds its key: under the keyword ``name``, or at ``position``.

  ``position`` counts params as 0. Either may be ``None``: a keyword-only
  parameter has no position, a positional-only one no keyword, and a key
  given by position to a function whose signature is unknown has no name.
  """

  given: int | str  # `rng_arg` as written, for messages
  name: str | None
  position: int | None


def check_rng_options(rng_arg: int | str | None, second_pass_rng: str) -> None:
  if second_pass_rng not in ("fresh", "same"):
    raise ValueError(
      f"sam_value_and_grad: `second_pass_rng` must be 'fresh' or 'same', got {second_pass_rng!r}."
    )
  if rng_arg is None or isinstance(rng_arg, str):
    return
  if not isinstance(rng_arg, int) or isinstance(rng_arg, bool) or rng_arg < 1:
    raise ValueError(
      "sam_value_and_grad: `rng_arg` must be the position of the key among "
      "fun's arguments (>= 1, as params are argument 0) or its keyword name, "
      f"got {rng_arg!r}."
    )


def _parameters(fun: Callable[..., Any]) -> list[inspect.Parameter] | None:
  """``fun``'s parameters in order, or ``None`` where Python cannot tell them (some builtins)."""
  try:
    return list(inspect.signature(fun).parameters.values())
  except (TypeError, ValueError):
    return None


def resolve_rng_arg(fun: Callable[..., Any], rng_arg: int | str | None) -> RngArg | None:
  """Where the key named by ``rng_arg`` (checked by :func:`check_rng_options`) sits in a call.

  Read from ``fun``'s signature once, when the gradient function is built, so
  that a key is found whether it is passed by keyword or positionally, and a
  name that ``fun`` cannot receive is refused at once.

  Example:
    >>> def loss(params, x, key, *, rate=0.5): ...
    >>> resolve_rng_arg(loss, "key")
    RngArg(given='key', name='key', position=2)
    >>> resolve_rng_arg(loss, 2)
    RngArg(given=2, name='key', position=2)
    >>> resolve_rng_arg(loss, "rng")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: sam_value_and_grad: rng_arg='rng' is not a parameter of fun(params, x, ...
  """
  if rng_arg is None:
    return None
  params = _parameters(fun)
  if isinstance(rng_arg, int):
    name = None
    # Positional parameters come first, so the index in the list is the position.
    if params is not None and rng_arg < len(params) and params[rng_arg].kind == _BOTH:
      name = params[rng_arg].name
    return RngArg(rng_arg, name, rng_arg)
  if params is None:
    return RngArg(rng_arg, rng_arg, None)  # found by keyword only
  for i, p in enumerate(params):
    if p.name != rng_arg or p.kind in _VARIADIC:
      continue
    if i == 0 and p.kind in _POSITIONAL:
      raise ValueError(
        f"sam_value_and_grad: rng_arg={rng_arg!r} names fun's first parameter, which "
        "receives the params; name the parameter that receives the PRNG key."
      )
    position = i if p.kind in _POSITIONAL else None
    name = None if p.kind == inspect.Parameter.POSITIONAL_ONLY else rng_arg
    return RngArg(rng_arg, name, position)
  if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params):
    return RngArg(rng_arg, rng_arg, None)  # may come through **kwargs at call time
  signature = inspect.Signature(params)
  raise ValueError(
    f"sam_value_and_grad: rng_arg={rng_arg!r} is not a parameter of fun{signature}; "
    "pass as `rng_arg` the name of the parameter that receives the PRNG key, or its "
    "position (params being 0)."
  )


def second_pass_args(
  args: tuple[Any, ...], kwargs: dict[str, Any], rng_arg: RngArg | None, mode: SecondPassRng
) -> tuple[tuple[Any, ...], dict[str, Any]]:
  """The arguments of the second (perturbed) pass.

  With ``mode="fresh"`` the key at ``rng_arg`` (see :func:`resolve_rng_arg`),
  passed by keyword or positionally, is replaced by
  ``jax.random.fold_in(key, 1)``: dropout draws a new mask, as in the
  official code, where each forward pass draws its own.

  Example:
    >>> def loss(params, x, key): ...
    >>> key = jax.random.key(0)
    >>> at = resolve_rng_arg(loss, "key")
    >>> by_keyword = second_pass_args((1.0,), {"key": key}, at, "fresh")[1]["key"]
    >>> by_position = second_pass_args((1.0, key), {}, at, "fresh")[0][1]
    >>> bool(by_keyword == by_position), bool(by_keyword == key)
    (True, False)
  """
  if rng_arg is None or mode == "same":
    return args, kwargs
  name, position = rng_arg.name, rng_arg.position
  if name is not None and name in kwargs:
    return args, {**kwargs, name: jax.random.fold_in(kwargs[name], 1)}
  if position is not None and position - 1 < len(args):
    i = position - 1  # fun's argument 0 is params, which are not in args
    return (*args[:i], jax.random.fold_in(args[i], 1), *args[i + 1 :]), kwargs
  given = rng_arg.given
  if name is None:
    raise ValueError(
      f"sam_value_and_grad: rng_arg={given!r} but fun received only {len(args) + 1} "
      "positional arguments (params included)."
    )
  if position is None:
    raise ValueError(
      f"sam_value_and_grad: rng_arg={given!r} names no keyword argument of this call "
      f"(got {sorted(kwargs)})."
    )
  raise ValueError(
    f"sam_value_and_grad: rng_arg={given!r} (fun's parameter {name!r}, at position "
    f"{position}) was passed neither by keyword nor positionally: this call has "
    f"{len(args) + 1} positional arguments (params included) and the keywords {sorted(kwargs)}."
  )
