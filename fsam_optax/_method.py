"""The method protocol: what a SAM-family method's state tells the gradient helper.

A method is an Optax transformation built by
:func:`fsam_optax.method_transformation` around a state type, a
``NamedTuple`` with the fields and methods of :class:`SAMState`. The state
says where to perturb (:meth:`SAMState.direction`) and what to hand on
(:meth:`SAMState.combine`); the helper does everything else the same way for
every method: both passes, every parallel layout, micro-batches, loss scaling,
schedules, diagnostics. The rules receive the gradients as lists of leaves
(in the order of ``jax.tree.leaves(params)``) and a :class:`SAMStep`, whose
norms and inner products are those of the whole tree on every layout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import jax

from fsam_optax._config import PerturbationConfig
from fsam_optax._layout import Layout
from fsam_optax._pairs import SAMGrad

Leaves = list[jax.Array]


class Direction(NamedTuple):
  """A direction ``d`` and the norm to divide it by, from :meth:`SAMState.direction`.

  The perturbation is ``e = rho d / (norm + eps)``. Return a plain list of
  leaves for ``norm = ||d||`` (``||theta d||`` with ``adaptive=True``), the
  usual case; return a ``Direction`` for another norm (Fisher-SAM's
  ``sqrt(<g, d>)``, say).

  Attributes:
    leaves: ``d``, one array a parameter leaf.
    norm: a scalar, computed with :meth:`SAMStep.norm` or :meth:`SAMStep.inner`.
  """

  leaves: Leaves
  norm: jax.Array


@dataclasses.dataclass(frozen=True)
class SAMStep:
  """What a method's rules know of the step: the choice of pass, hyperparameters, tree maths.

  Attributes:
    two_pass: whether this step takes both passes (a SAM step), a Python bool.
      On a one-pass step (the host chose ``sam_step=False``, or the schedule
      left the step out) :meth:`SAMState.combine` receives ``g`` as the
      perturbed gradient.
    hyperparam: the live value of one of the state's scalars, by name (under
      ``optax.inject_hyperparams``, the value the user set last).
    params: the weights ``theta`` the clean gradient was taken at, one array
      a leaf (each replica's shards, as the gradients).
  """

  two_pass: bool
  hyperparam: Callable[[str], jax.Array]
  params: Leaves = dataclasses.field(repr=False)
  _layout: Layout = dataclasses.field(repr=False)
  _mask: Sequence[bool] = dataclasses.field(repr=False)

  @property
  def per_device(self) -> bool:
    """Whether the rules see each replica's own gradients (``perturbation="per_device"``)."""
    return self._layout.per_device

  def mean(self, leaves: Sequence[jax.Array]) -> list[jax.Array]:
    """``leaves`` averaged over the data replicas with ``perturbation="per_device"``.

    The gradients as the whole batch gives them, where each replica's rules
    see its own; unchanged otherwise (the rules then see the average already).
    """
    return list(self._layout.mean_grads(list(leaves))) if self.per_device else list(leaves)

  def norm(self, leaves: Sequence[jax.Array], *, include_masked: bool = False) -> jax.Array:
    """The L2 norm of the whole tree of perturbed (unmasked) leaves, on any layout.

    Summed over the devices that hold shards of split parameters, in at least
    float32. With ``include_masked``, of every leaf (a gradient clip's norm).
    """
    return self._layout.norm(list(leaves) if include_masked else self._perturbed(leaves))

  def inner(self, a: Sequence[jax.Array], b: Sequence[jax.Array]) -> jax.Array:
    """The inner product ``<a, b>`` of two whole trees of perturbed leaves, on any layout."""
    return self._layout.inner(self._perturbed(a), self._perturbed(b))

  def inner_and_norm(
    self, a: Sequence[jax.Array], b: Sequence[jax.Array]
  ) -> tuple[jax.Array, jax.Array]:
    """``(<a, b>, ||b||)`` from one pass over the leaves (``b`` read once for both)."""
    return self._layout.inner_and_norm(self._perturbed(a), self._perturbed(b))

  def where_perturbed(self, new: Sequence[Any], old: Sequence[Any]) -> list[Any]:
    """``new`` at the perturbed leaves and ``old`` at those ``mask=`` leaves out."""
    return [n if k else o for n, o, k in zip(new, old, self._mask, strict=True)]

  def _perturbed(self, leaves: Sequence[Any]) -> list[Any]:
    return [x if k else None for x, k in zip(leaves, self._mask, strict=True)]


class SAMState(Protocol):
  """The state of a SAM-family method: a ``NamedTuple`` with these fields and methods.

  :func:`fsam_optax.method_transformation` fills the fields: ``count``,
  ``rho``, ``eps``, ``config``, a field for each scalar hyperparameter, and
  one for the method's parameter-shaped buffer if it has one.
  """

  @property
  def count(self) -> jax.Array:
    """The number of updates applied so far."""

  @property
  def rho(self) -> jax.Array:
    """The radius of the next perturbation."""

  @property
  def eps(self) -> jax.Array:
    """Added to the norm before dividing by it."""

  @property
  def config(self) -> PerturbationConfig:
    """Static settings: mask, adaptive mode, schedule, non-finite guard, the method's name."""

  def direction(self, grads: Leaves, step: SAMStep) -> Leaves | Direction:
    """The direction to perturb along, from the clean gradient ``g``.

    ``grads`` is ``g`` averaged over the data axes, or the replica's own with
    ``perturbation="per_device"``. Return ``d`` as a list of leaves, or a
    :class:`Direction` to divide it by a norm of the method's own.
    """

  def terms_at_update(self, terms: list[jax.Array | None]) -> list[jax.Array | None]:
    """Optional: the :attr:`SAMGrad.after_base` terms as :func:`fsam_optax.chain` adds them.

    Called on the state the update returned, with one term a leaf (``None``
    where a leaf has none). It applies what only the update knows: WSAM
    multiplies by the learning rate of this update, which
    ``optax.inject_hyperparams`` sets at the update, after the gradients were
    taken. Without it the terms are added as ``combine`` returned them.
    """

  def combine(self, perturbed: Leaves, clean: Leaves, step: SAMStep) -> list[SAMGrad]:
    """Optional: what the update receives, a :class:`SAMGrad` a leaf.

    ``perturbed`` is ``g'`` (``g`` itself on a one-pass step) and ``clean``
    is ``g``; with ``perturbation="per_device"`` both are the replica's own
    and the helper averages what this returns. Without it, the base optimizer
    receives ``perturbed`` and the method keeps no buffer.
    """


_REQUIRED_FIELDS = ("count", "rho", "eps", "config")
STATE_TYPES: list[type] = []


def register(state_type: type, name: str, fields: Sequence[str]) -> None:
  """Makes ``state_type`` a method's state, or raises a TypeError naming the missing piece."""
  own = getattr(state_type, "_fields", None)
  if own is None:
    raise TypeError(f"{name}: the state type {state_type.__name__} must be a NamedTuple.")
  missing = [f for f in (*_REQUIRED_FIELDS, *fields) if f not in own]
  if missing:
    raise TypeError(
      f"{name}: the state type {state_type.__name__} lacks the field(s) {missing}; a "
      "method's state has `count`, `rho`, `eps`, `config`, a field for each scalar "
      "hyperparameter and one for its buffer (see fsam_optax.SAMState)."
    )
  if not callable(getattr(state_type, "direction", None)):
    raise TypeError(
      f"{name}: the state type {state_type.__name__} has no `direction(self, grads, step)` "
      "method: the gradient helper asks it where to perturb (see fsam_optax.SAMState)."
    )
  if state_type not in STATE_TYPES:
    STATE_TYPES.append(state_type)


def method_name(state: Any) -> str:
  """The transformation that built ``state``, for error messages: ``sam`` for ``sam(...)``'s.

  The builder records it in the static config (``sam`` and ``fsam`` both build
  an ``FSAMState``); a state built elsewhere is named after its type:
  ``FixedDirectionState`` -> ``fixeddirection``.
  """
  config = getattr(state, "config", None)
  return getattr(config, "method", "") or type(state).__name__.removesuffix("State").lower()
