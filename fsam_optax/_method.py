"""What a SAM-family method provides, for the gradient helper to drive it.

A method is a transformation whose state, first in the chain, tells
:func:`fsam_optax.sam_value_and_grad` how to perturb and what to hand its
update. The state is a ``NamedTuple`` registered with :func:`sam_state` that
has the fields and methods of :class:`SAMState`; everything else (both
passes, every layout, micro-batches, loss scaling, schedules, diagnostics)
the helper does the same for every method.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax

from fsam_optax._config import PerturbationConfig
from fsam_optax._layout import Layout
from fsam_optax._perturbation import Direction


class Step(NamedTuple):
  """What the helper knows of the step it is computing, for a method's rules.

  Attributes:
    layout: the parallel layout: whole-tree norms and means over the devices.
    hyperparam: the live value of one of the state's scalars, by name (under
      ``inject_hyperparams``, the value the user set last).
    sam_step: whether this step takes the SAM step, a Python bool. ``False``
      is a one-pass step: the host chose it (``sam_step=False``), or it is
      the branch of a skipped step in the ``lax.cond`` of a schedule on the
      device, where the helper runs the method's rules in each branch.
  """

  layout: Layout
  hyperparam: Callable[[str], jax.Array]
  sam_step: bool


class SAMState(Protocol):
  """The state of a SAM-family method, as the gradient helper reads it."""

  @property
  def count(self) -> jax.Array:
    """The number of updates applied so far (the schedule of SAM steps reads it)."""

  @property
  def rho(self) -> jax.Array:
    """The radius of the next perturbation."""

  @property
  def eps(self) -> jax.Array:
    """Added to the direction's norm before dividing by it."""

  @property
  def config(self) -> PerturbationConfig:
    """Adaptive mode, mask, non-finite guard, schedule, and the method's name."""

  def direction(self, grads: list[jax.Array], step: Step) -> Direction:
    """The direction to perturb along, from the clean gradient's leaves.

    ``grads`` is averaged over the data axes, or the device's own gradient with
    ``perturbation="per_device"``.
    """

  def pairs(self, perturbed: Any, clean: Any, step: Step) -> Any:
    """The tree of ``SAMGrad`` pairs that the method's update consumes.

    ``perturbed`` is ``g'`` (on a one-pass step, ``step.sam_step``
    is ``False`` and it is ``g``) and ``clean``
    is ``g``, both averaged over the data axes; with
    ``perturbation="per_device"`` both are the data replica's own, and the
    helper averages the pairs this returns.
    """


_REQUIRED = ("count", "rho", "eps", "config", "direction", "pairs")
STATE_TYPES: list[type] = []


def method_name(state: Any) -> str:
  """The transformation that built ``state``, for error messages: ``sam`` for ``sam(...)``'s.

  The factory records it in the static config (``sam`` and ``fsam`` both build
  an ``FSAMState``); a state built elsewhere is named after its type:
  ``FixedDirectionState`` -> ``fixeddirection``.
  """
  config = getattr(state, "config", None)
  return getattr(config, "method", "") or type(state).__name__.removesuffix("State").lower()


def sam_state(cls: type) -> type:
  """Registers ``cls`` as the state of a SAM-family method (a class decorator)."""
  missing = [name for name in _REQUIRED if not hasattr(cls, name)]
  if missing:
    raise TypeError(f"{cls.__name__} lacks {missing} of a SAM-family state (see SAMState).")
  STATE_TYPES.append(cls)
  return cls
