"""Friendly Sharpness-Aware Minimization (F-SAM) and its family for Optax."""

from fsam_optax._config import PerturbationConfig
from fsam_optax._diagnostics import SAMDiagnostics
from fsam_optax._fsam import FSAMState, fsam, sam
from fsam_optax._gsam import GSAMState, gsam, gsam_rho_schedule
from fsam_optax._looksam import LookSAMState, looksam
from fsam_optax._pairs import SAMGrad, clean_grads, perturbed_grads
from fsam_optax._schedule import is_sam_step
from fsam_optax._shardings import opt_state_shardings
from fsam_optax._value_and_grad import sam_value_and_grad
from fsam_optax._vasso import VaSSOState, vasso

__version__ = "0.2.0"

__all__ = [
  "FSAMState",
  "GSAMState",
  "LookSAMState",
  "PerturbationConfig",
  "SAMDiagnostics",
  "SAMGrad",
  "VaSSOState",
  "clean_grads",
  "fsam",
  "gsam",
  "gsam_rho_schedule",
  "is_sam_step",
  "looksam",
  "opt_state_shardings",
  "perturbed_grads",
  "sam",
  "sam_value_and_grad",
  "vasso",
]
