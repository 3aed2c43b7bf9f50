"""Fisher SAM (Kim et al., ICML 2022) as a method of fsam_optax.

SAM's ball measured in the diagonal Fisher metric ``f = 1 + eta g * g``:
``e = rho f^-1 g / sqrt(<g, f^-1 g>)``, and the base optimizer receives the
gradient at ``theta + e``.
"""

from typing import NamedTuple

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

  def direction(self, grads, step):
    """``f^-1 g``, divided by ``sqrt(<g, f^-1 g>)`` rather than by its own norm."""
    eta = step.hyperparam("eta")
    d = [g / (1 + eta * g * g) for g in grads]
    return fsam_optax.Direction(d, jnp.sqrt(step.inner(grads, d)))


def fisher_sam(
  rho: optax.ScalarOrSchedule = 0.1,
  eta: float | jax.Array = 1.0,
  *,
  eps: float | jax.Array = 1e-12,
  mask=None,
  skip_nonfinite: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Fisher SAM: perturb inside the Fisher ellipsoid of radius ``rho``.

  Args:
    rho: the radius (``gamma`` in the paper), ``>= 0``.
    eta: the weight of the squared gradient in the metric, ``>= 0`` (0: SAM).
    eps: added to the norm before dividing, ``> 0``.
    mask: leaves that are ``False`` are not perturbed.
    skip_nonfinite: leave the state unchanged on a non-finite step.
  """
  if isinstance(eta, float | int) and not eta >= 0:
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
