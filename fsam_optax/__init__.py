"""Friendly Sharpness-Aware Minimization (F-SAM) and its family for Optax."""

from fsam_optax._chain import chain
from fsam_optax._config import PerturbationConfig
from fsam_optax._diagnostics import SAMDiagnostics
from fsam_optax._fsam import FSAMState, fsam
from fsam_optax._gsam import GSAMState, gsam
from fsam_optax._gsam_rho import gsam_rho_schedule
from fsam_optax._looksam import LookSAMState, looksam
from fsam_optax._method import Direction, SAMState, SAMStep
from fsam_optax._pairs import SAMGrad, base_grads
from fsam_optax._sam import sam
from fsam_optax._schedule import is_sam_step
from fsam_optax._shardings import opt_state_shardings
from fsam_optax._transformation import method_transformation
from fsam_optax._value_and_grad import sam_value_and_grad
from fsam_optax._vasso import VaSSOState, vasso
from fsam_optax._wsam import WSAMState, wsam

__version__ = "0.2.0"

__all__ = [
  "Direction",
  "FSAMState",
  "GSAMState",
  "LookSAMState",
  "PerturbationConfig",
  "SAMDiagnostics",
  "SAMGrad",
  "SAMState",
  "SAMStep",
  "VaSSOState",
  "WSAMState",
  "base_grads",
  "chain",
  "fsam",
  "gsam",
  "gsam_rho_schedule",
  "is_sam_step",
  "looksam",
  "method_transformation",
  "opt_state_shardings",
  "sam",
  "sam_value_and_grad",
  "vasso",
  "wsam",
]
