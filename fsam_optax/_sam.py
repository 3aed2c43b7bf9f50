"""Sharpness-Aware Minimization (SAM): F-SAM's state with ``sigma = 0`` and no average.

``e = rho g / (||g|| + eps)`` and the base optimizer receives ``g'``, the
gradient at ``theta + e`` (:class:`fsam_optax.FSAMState` with ``ema=None``).
"""

from __future__ import annotations

import jax
import optax

from fsam_optax._fsam import FSAMState
from fsam_optax._mask import Mask
from fsam_optax._transformation import method_transformation


def sam(
  rho: optax.ScalarOrSchedule = 0.05,
  *,
  adaptive: bool = False,
  eps: float | jax.Array = 1e-12,
  mask: Mask | None = None,
  every: int | None = None,
  probability: float | None = None,
  seed: int | None = None,
  skip_nonfinite: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Sharpness-Aware Minimization: :func:`fsam` with ``sigma = 0``.

  Keeps no moving average; ``adaptive=True`` is the PyTorch SAM code's
  adaptive form (``|theta|``, no ``eta``).

  Args:
    rho: perturbation radius, ``>= 0``; a scalar or a schedule of the step.
    adaptive: the PyTorch SAM code's adaptive perturbation (``|theta|``, no ``eta``).
    eps: added to the norm before dividing, ``> 0``.
    mask: pytree of bools (or a callable of the params returning one); leaves
      that are ``False`` are not perturbed.
    every: take the SAM step every ``every`` steps only (see :func:`fsam`).
    probability: take the SAM step with this probability (see :func:`fsam`).
    seed: seed of the ``probability`` draws.
    skip_nonfinite: leave the state unchanged on a non-finite step (see
      :func:`fsam`).

  Returns:
    A :class:`optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax.numpy as jnp, optax, fsam_optax
    >>> tx = optax.chain(fsam_optax.sam(rho=0.05), optax.sgd(0.1))
    >>> tx.init({"w": jnp.zeros(3)})[0].ema is None
    True

  References:
    Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
    Generalization <https://arxiv.org/abs/2010.01412>`_, ICLR 2021.
  """
  return method_transformation(
    FSAMState,
    "sam",
    rho=rho,
    eps=eps,
    scalars={"sigma": 0.0, "lmbda": 0.0},
    adaptive=adaptive,
    mask=mask,
    every=every,
    probability=probability,
    seed=seed,
    skip_nonfinite=skip_nonfinite,
  )
