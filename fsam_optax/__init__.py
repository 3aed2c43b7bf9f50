"""Friendly Sharpness-Aware Minimization (F-SAM) for Optax."""

from fsam_optax._config import PerturbationConfig
from fsam_optax._diagnostics import SAMDiagnostics
from fsam_optax._fsam import FSAMState, fsam, sam
from fsam_optax._pairs import SAMGrad, clean_grads, perturbed_grads
from fsam_optax._shardings import opt_state_shardings
from fsam_optax._value_and_grad import sam_value_and_grad

__version__ = "0.2.0"

__all__ = [
  "FSAMState",
  "PerturbationConfig",
  "SAMDiagnostics",
  "SAMGrad",
  "clean_grads",
  "fsam",
  "opt_state_shardings",
  "perturbed_grads",
  "sam",
  "sam_value_and_grad",
]
