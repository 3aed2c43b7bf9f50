"""Which random key each of the two passes receives."""

from __future__ import annotations

from typing import Any, Literal

import jax

SecondPassRng = Literal["fresh", "same"]


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


def second_pass_args(
  args: tuple[Any, ...], kwargs: dict[str, Any], rng_arg: int | str | None, mode: SecondPassRng
) -> tuple[tuple[Any, ...], dict[str, Any]]:
  """The arguments of the second (perturbed) pass.

  With ``mode="fresh"`` the key named by ``rng_arg`` is replaced by
  ``jax.random.fold_in(key, 1)``: dropout draws a new mask, as in the
  official code, where each forward pass draws its own.
  """
  if rng_arg is None or mode == "same":
    return args, kwargs
  if isinstance(rng_arg, str):
    if rng_arg not in kwargs:
      raise ValueError(
        f"sam_value_and_grad: rng_arg={rng_arg!r} names no keyword argument of "
        f"this call (got {sorted(kwargs)})."
      )
    return args, {**kwargs, rng_arg: jax.random.fold_in(kwargs[rng_arg], 1)}
  i = rng_arg - 1  # fun's argument 0 is params, which are not in args
  if i >= len(args):
    raise ValueError(
      f"sam_value_and_grad: rng_arg={rng_arg} but fun received only "
      f"{len(args) + 1} positional arguments (params included)."
    )
  return (*args[:i], jax.random.fold_in(args[i], 1), *args[i + 1 :]), kwargs
