"""Weighted SAM (WSAM): sharpness as a regulariser of weight ``gamma / (1 - gamma)``."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fsam_optax._config import PerturbationConfig
from fsam_optax._hyperparams import at, check
from fsam_optax._mask import Mask
from fsam_optax._method import Leaves, SAMStep
from fsam_optax._pairs import SAMGrad
from fsam_optax._transformation import method_transformation

CLIP_EPS = 1e-6  # added to the norm by the official class's clipping (PyTorch's clip_grad_norm_)


class WSAMState(NamedTuple):
  """State of :func:`wsam`.

  Attributes:
    count: number of updates applied so far (int32).
    rho: perturbation radius for the next step (a schedule is evaluated here).
    gamma: the sharpness term's weight is ``gamma / (1 - gamma)``.
    eps: added to the norm before dividing by it.
    config: static settings (``decoupled`` and ``max_norm`` among its options).
    learning_rate: the base optimizer's learning rate at the last update (at
      ``count = 0``, at the first), which scales the decoupled form's term;
      ``None`` in the coupled form.
  """

  count: jax.Array  # type: ignore[assignment]
  rho: jax.Array
  gamma: jax.Array
  eps: jax.Array
  config: PerturbationConfig
  learning_rate: jax.Array | None = None

  def direction(self, grads: Leaves, step: SAMStep) -> Leaves:
    """``g`` itself, as SAM."""
    return grads

  def terms_at_update(self, terms: list[jax.Array | None]) -> list[jax.Array | None]:
    """``-lr alpha (g' - g)``, from ``g' - g`` and the learning rate of this update."""
    lr = self.learning_rate
    assert lr is not None  # the decoupled form keeps one; the coupled form adds no term

    def scaled(t: jax.Array) -> jax.Array:
      acc = jnp.result_type(jnp.float32, t.dtype)
      gamma = self.gamma.astype(acc)
      return ((-lr.astype(acc) * (gamma / (1 - gamma))) * t.astype(acc)).astype(t.dtype)

    return [None if t is None else scaled(t) for t in terms]

  def combine(self, perturbed: Leaves, clean: Leaves, step: SAMStep) -> list[SAMGrad]:
    """``g`` and the sharpness term, or their weighted sum; ``g`` on a one-pass step.

    Masked leaves receive ``g`` and no term: the method leaves them alone.
    """
    acc = jnp.result_type(jnp.float32, *(g.dtype for g in clean))
    g = [x.astype(acc) for x in clean]
    gp = [x.astype(acc) for x in perturbed] if step.two_pass else g
    max_norm = self.config.option("max_norm")
    if isinstance(max_norm, float):
      # As the class: the gradients averaged over the workers, clipped.
      g = _clipped(step.mean(g), max_norm, step)
      gp = _clipped(step.mean(gp), max_norm, step) if step.two_pass else g
    plain = [SAMGrad(x.astype(c.dtype)) for x, c in zip(g, clean, strict=True)]
    if not step.two_pass:
      return plain
    if self.config.option("decoupled"):
      # g' - g, scaled by -lr alpha at the update, which sets lr (terms_at_update).
      combined = [
        SAMGrad(x.grad, after_base=(b - a).astype(x.grad.dtype))
        for x, a, b in zip(plain, g, gp, strict=True)
      ]
    else:
      gamma = step.hyperparam("gamma").astype(acc)
      alpha = gamma / (1 - gamma)
      combined = [
        SAMGrad((b * alpha + a * (1 - alpha)).astype(c.dtype))
        for a, b, c in zip(g, gp, clean, strict=True)
      ]
    return step.where_perturbed(combined, plain)


def _clipped(grads: Leaves, max_norm: float, step: SAMStep) -> Leaves:
  """``grads`` times ``min(1, max_norm / (||grads|| + 1e-6))``, the norm over every leaf."""
  norm = step.norm(grads, include_masked=True)
  scale = jnp.minimum(1, max_norm / (norm + CLIP_EPS)).astype(norm.dtype)
  return [g * scale for g in grads]


def wsam(
  rho: optax.ScalarOrSchedule = 0.05,
  gamma: float | jax.Array = 0.9,
  *,
  learning_rate: optax.ScalarOrSchedule | None = None,
  decoupled: bool = True,
  max_norm: float | None = None,
  adaptive: bool = False,
  eps: float | jax.Array = 1e-12,
  mask: Mask | None = None,
  skip_nonfinite: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Weighted Sharpness-Aware Minimization (WSAM), as the authors' ``WeightedSAM`` class.

  With ``alpha = gamma / (1 - gamma)``, ``e = rho g / (||g|| + eps)`` and
  ``g' = grad L(theta + e)``, WSAM minimises the loss plus ``alpha`` times
  the sharpness ``L(theta + e) - L(theta)``:

  - decoupled (the default): the base optimizer receives ``g``, and the
    sharpness term
    :math:`-\eta_t\, \alpha\, (g' - g)`, with :math:`\eta_t` the base
    optimizer's learning rate at this update, is added to its update after it,
    past its momentum, weight decay and preconditioning. Build the optimizer
    with :func:`fsam_optax.chain` (``optax.chain`` has no place for the term)
    and pass the base optimizer's ``learning_rate``, the same number or
    schedule.
  - coupled (``decoupled=False``): the base optimizer receives
    ``alpha g' + (1 - alpha) g``; ``gamma = 0.5`` is SAM.

  With ``max_norm``, ``g`` (once ``e`` is made) and ``g'`` are each scaled by
  ``min(1, max_norm / (norm + 1e-6))``, their own global norm over every leaf:
  PyTorch's ``clip_grad_norm_``, which the class calls, not
  ``optax.clip_by_global_norm``. With ``perturbation="per_device"`` each
  replica perturbs with its own ``g`` and the clipping acts on the gradients
  averaged over the replicas, as the class under ``DistributedDataParallel``.
  Masked leaves are left alone: not perturbed, and they receive ``g`` with no
  term (a leaf the base optimizer freezes must be masked here too, since the
  term bypasses the base optimizer). On a one-pass step (``sam_step=False``)
  the base optimizer receives ``g`` (clipped) and nothing is added. A
  non-finite term makes the step non-finite, so that ``skip_nonfinite`` with
  ``optax.apply_if_finite`` leaves it out.

  Args:
    rho: perturbation radius, ``>= 0``; a scalar or a schedule of the step.
    gamma: in ``[0, 1)``; the sharpness term's weight is ``gamma / (1 - gamma)``.
    learning_rate: the base optimizer's learning rate, a number or the same
      schedule (evaluated at the count of the update it belongs to); required
      by the decoupled form, refused by the coupled one. It is read when the
      update runs, so a value ``optax.inject_hyperparams`` sets (around
      ``wsam`` or around the whole optimizer) scales that update's term.
    decoupled: add the sharpness term after the base optimizer (``True``) or
      hand it the weighted sum of the gradients (``False``).
    max_norm: clip ``g`` and ``g'`` to this global norm, ``> 0``; ``None``: off.
      A Python number (under ``optax.inject_hyperparams``, name it in
      ``static_args``).
    adaptive: the PyTorch SAM code's adaptive form (``|theta|``, no ``eta``),
      as the class's ``adaptive``.
    eps: added to the norm before dividing, ``> 0``.
    mask: pytree of bools (or a callable of the params returning one); leaves
      that are ``False`` are not perturbed, are left out of ``||g||``, and
      receive ``g`` with no term.
    skip_nonfinite: leave the state unchanged on a non-finite step (see :func:`fsam`).

  Returns:
    A :class:`optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax.numpy as jnp, optax, fsam_optax
    >>> lr = optax.cosine_decay_schedule(0.1, 100)
    >>> tx = fsam_optax.chain(
    ...   fsam_optax.wsam(rho=0.05, gamma=0.9, learning_rate=lr),
    ...   optax.sgd(lr, momentum=0.9),
    ... )
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> grad_fn = fsam_optax.sam_value_and_grad(lambda p: jnp.sum(p["w"] ** 4))
    >>> opt_state = tx.init(params)
    >>> value, grads = grad_fn(params, opt_state)
    >>> updates, opt_state = tx.update(grads, opt_state, params)
    >>> print(float(value))
    17.0

  References:
    Yue et al., `Sharpness-Aware Minimization Revisited: Weighted Sharpness as
    a Regularization Term <https://arxiv.org/abs/2305.15817>`_, KDD 2023.
  """
  check("wsam", "gamma", gamma, lambda v: 0 <= v < 1, "in [0, 1) (0.5 with decoupled=False: SAM)")
  if not isinstance(decoupled, bool):
    raise ValueError(f"wsam: `decoupled` must be a Python bool, got {decoupled!r}.")
  if max_norm is not None:
    if isinstance(max_norm, bool) or not isinstance(max_norm, int | float):
      raise ValueError(
        f"wsam: `max_norm` must be a Python number or None, got {type(max_norm).__name__}; "
        'under optax.inject_hyperparams, pass static_args=("max_norm",).'
      )
    if not max_norm > 0:
      raise ValueError(f"wsam: `max_norm` must be > 0 (None: no clipping), got {max_norm!r}.")
  if decoupled:
    if learning_rate is None:
      raise ValueError(
        "wsam: the decoupled form (decoupled=True, the default) adds -learning_rate * "
        "gamma / (1 - gamma) * (g' - g) after the base optimizer: pass its `learning_rate` "
        "(the same number or schedule), or decoupled=False for the coupled form."
      )
    check("wsam", "learning_rate", learning_rate, lambda v: v >= 0, ">= 0", schedule=True)
  elif learning_rate is not None:
    raise ValueError(
      "wsam: `learning_rate` is read by the decoupled form only; drop it, or set decoupled=True."
    )
  tx = method_transformation(
    WSAMState,
    "wsam",
    rho=rho,
    eps=eps,
    scalars={"gamma": gamma},
    options={"decoupled": decoupled, "max_norm": None if max_norm is None else float(max_norm)},
    adaptive=adaptive,
    mask=mask,
    skip_nonfinite=skip_nonfinite,
  )
  if learning_rate is None:
    return tx
  return _with_learning_rate(tx, learning_rate)


def _with_learning_rate(
  tx: optax.GradientTransformationExtraArgs, learning_rate: optax.ScalarOrSchedule
) -> optax.GradientTransformationExtraArgs:
  """``tx`` keeping, in ``learning_rate``, the learning rate of the update it last took."""

  def init_fn(params: optax.Params) -> WSAMState:
    state = tx.init(params)
    return state._replace(learning_rate=at(learning_rate, state.count))

  def update_fn(
    updates: optax.Updates, state: WSAMState, params: optax.Params | None = None, **extra: Any
  ) -> tuple[optax.Updates, WSAMState]:
    updates, new_state = tx.update(updates, state, params, **extra)
    taken = new_state.count != state.count  # not on a step skip_nonfinite left out
    last = state.learning_rate
    assert last is not None  # init_fn sets it
    now = jnp.where(taken, at(learning_rate, state.count), last)
    return updates, new_state._replace(learning_rate=now)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
