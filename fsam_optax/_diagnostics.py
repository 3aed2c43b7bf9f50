"""What one SAM step measured: the losses and norms that come for free with the two passes."""

from __future__ import annotations

from typing import NamedTuple

import jax


class PerturbationNorms(NamedTuple):
  """The norms of one perturbation (all 0 on a one-pass step)."""

  direction: jax.Array
  perturbation: jax.Array
  applied: jax.Array


class SAMDiagnostics(NamedTuple):
  """Per-step quantities that come for free with the two passes.

  Attributes:
    value: loss at the weights ``theta`` (the clean pass).
    perturbed_value: loss at ``theta + e`` (the second pass); on a step
      that takes one pass (host's choice or schedule), the clean loss.
    direction_norm: global norm ``n`` of the direction ``d`` (of ``|theta| d``
      in adaptive mode), before scaling to the radius; 0 on a one-pass step.
    perturbation_norm: global norm of the perturbation ``e`` (``rho`` for
      the non-adaptive perturbation); 0 on a one-pass step.
    applied_perturbation_norm: global norm of the perturbation actually
      applied, ``(theta + e) - theta`` with ``theta + e`` rounded to the
      params' dtype. When that dtype cannot resolve ``e`` (bfloat16 weights)
      it differs from ``perturbation_norm``: lower where ``theta + e`` rounds
      back to ``theta``, and possibly higher where a weight jumps a whole
      step of its dtype instead of ``e_i``; 0 on a one-pass step.
    clean_grad_norm: global norm of the clean gradient ``g`` (averaged over
      ``axis_name``; after ``clip_clean_grad``).
    perturbed_grad_norm: global norm of the perturbed gradient ``g'``; on a
      one-pass step, of the clean gradient ``g`` that takes its place.
  """

  value: jax.Array
  perturbed_value: jax.Array
  direction_norm: jax.Array
  perturbation_norm: jax.Array
  applied_perturbation_norm: jax.Array
  clean_grad_norm: jax.Array
  perturbed_grad_norm: jax.Array

  @property
  def sharpness(self) -> jax.Array:
    """Perturbed loss minus clean loss."""
    return self.perturbed_value - self.value
