"""The static part of a SAM-family state: settings fixed when the state is built."""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable

import jax


@dataclasses.dataclass(frozen=True)
class PerturbationConfig:
  """Static settings the gradient helper reads from the state.

  Every field is a plain, hashable Python value fixed by ``tx.init``: the
  config compares by value, so two optimizers built with the same options for
  params of the same structure give states of the same tree structure, and a
  state saved from one restores into the other. It is a pytree with no leaves
  (``jax.tree_util.register_static``): it travels through ``jit``, ``scan``
  and checkpoints without becoming a traced value, and checkpoints do not
  store it (the restore target, built by ``tx.init``, supplies it).

  Attributes:
    adaptive: the PyTorch SAM code's adaptive perturbation (``|theta|``, no ``eta``).
    mask: one bool per parameter leaf (``False``: not perturbed), resolved
      from the method's ``mask`` at ``tx.init``; ``None`` perturbs every leaf.
    skip_nonfinite: the method leaves its state unchanged on a step whose
      gradients are not all finite.
    every, probability, seed: which steps take the SAM step (see
      :func:`fsam`'s arguments of the same names); ``1``, ``1.0``: every step.
    method: the name of the transformation that built the state (``"fsam"``,
      ``"sam"``, ``"gsam"``, ``"vasso"``, ``"looksam"``, ``"wsam"``, or a method of one's
      own), for error messages.
    buffer: the name of the state's parameter-shaped buffer (``"ema"``,
      ``"g_v"``), or ``None`` for a method without one.
    options: the method's own static options, ``(name, value)`` pairs sorted
      by name (WSAM's ``decoupled`` and ``max_norm``, GSAM's ``minimize``):
      read them with :meth:`option`.
  """

  adaptive: bool = False
  mask: tuple[bool, ...] | None = None
  skip_nonfinite: bool = False
  every: int = 1
  probability: float = 1.0
  seed: int = 0
  method: str = ""
  buffer: str | None = None
  options: tuple[tuple[str, Hashable], ...] = ()

  def option(self, name: str) -> Hashable:
    """The value of the method's static option ``name``.

    Example:
      >>> from fsam_optax import PerturbationConfig
      >>> PerturbationConfig(options=(("decoupled", True),)).option("decoupled")
      True
    """
    for key, value in self.options:
      if key == name:
        return value
    known = [key for key, _ in self.options]
    raise ValueError(
      f"{self.method or 'the method'} has no static option `{name}`; it has {known}."
    )

  @property
  def schedule(self) -> tuple[int, float, int]:
    """``(every, probability, seed)``: which steps take the SAM step."""
    return self.every, self.probability, self.seed


jax.tree_util.register_static(PerturbationConfig)


def _register_with_flax() -> None:
  """Makes ``flax.serialization`` skip the config, as checkpoints do.

  ``to_bytes`` / ``to_state_dict`` record ``{}`` for it and the restore target
  supplies it back. Flax stays optional: without it there is nothing to do.
  """
  try:
    from flax import serialization
  except ImportError:
    return
  serialization.register_serialization_state(
    PerturbationConfig, lambda _: {}, lambda target, _: target, override=True
  )


_register_with_flax()
