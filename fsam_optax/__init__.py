"""Friendly Sharpness-Aware Minimization (F-SAM) for Optax."""

from fsam_optax._fsam import FSAMState, PerturbationConfig, SAMGrad, fsam, sam
from fsam_optax._value_and_grad import SAMDiagnostics, sam_value_and_grad

__version__ = "0.2.0"

__all__ = [
  "FSAMState",
  "PerturbationConfig",
  "SAMDiagnostics",
  "SAMGrad",
  "fsam",
  "sam",
  "sam_value_and_grad",
]
