"""Friendly Sharpness-Aware Minimization (F-SAM) for Optax."""

from fsam_optax._config import PerturbationConfig
from fsam_optax._fsam import FSAMState, SAMGrad, fsam, sam
from fsam_optax._pairs import clean_grads, perturbed_grads
from fsam_optax._sharding import opt_state_shardings
from fsam_optax._value_and_grad import SAMDiagnostics, sam_value_and_grad

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
