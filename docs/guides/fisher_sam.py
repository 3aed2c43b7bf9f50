"""Fisher SAM (Kim et al., ICML 2022): SAM's ball in the diagonal Fisher metric.

``f = 1 + eta g * g``, ``e = rho f^-1 g / sqrt(<g, f^-1 g>)``; the base optimizer
receives the gradient at ``theta + e``.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import fsam_optax


class FisherSAMState(NamedTuple):
  count: jax.Array
  rho: jax.Array
  eta: jax.Array
  eps: jax.Array
  config: fsam_optax.PerturbationConfig

  def direction(self, grads: list[jax.Array], step: fsam_optax.SAMStep) -> fsam_optax.Direction:
    """``f^-1 g``, divided by ``sqrt(<g, f^-1 g>)`` rather than by its own norm."""
    eta = step.hyperparam("eta")
    d = [g / (1 + eta * g * g) for g in grads]
    return fsam_optax.Direction(d, jnp.sqrt(step.inner(grads, d)))


def fisher_sam(
  rho: optax.ScalarOrSchedule = 0.1,
  eta: float | jax.Array = 1.0,
  *,
  eps: float | jax.Array = 1e-12,
  mask: Any = None,
  skip_nonfinite: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Fisher SAM: perturb inside the Fisher ellipsoid of radius ``rho``.

  Args:
    rho: the radius (``gamma`` in the paper), ``>= 0``.
    eta: the weight of the squared gradient in the metric, ``>= 0`` (0: SAM).
    eps: added to the norm before dividing, ``> 0``.
    mask, skip_nonfinite: as :func:`fsam_optax.fsam`'s.

  Returns:
    An optax transformation, first in the chain, fed by ``sam_value_and_grad``.
  """
  if isinstance(eta, bool) or (isinstance(eta, float | int) and not eta >= 0):
    raise ValueError(f"fisher_sam: `eta` must be >= 0 (0: SAM), got {eta!r}.")
  return fsam_optax.method_transformation(
    FisherSAMState,
    "fisher_sam",
    rho=rho,
    eps=eps,
    scalars={"eta": eta},
    mask=mask,
    skip_nonfinite=skip_nonfinite,
  )
