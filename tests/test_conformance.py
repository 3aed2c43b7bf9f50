"""The built-in methods pass ``fsam_optax.testing``, and methods that break it fail it.

Each built-in runs every check (its parallel layouts in a process of 8 CPU devices);
LookSAM with ``every=2`` takes both kinds of step in the checks' 4 steps.
"""

from __future__ import annotations

import functools
import pathlib
import unittest

import pytest

import fsam_optax
from fsam_optax import testing

FSAM = functools.partial(fsam_optax.fsam, rho=0.2, sigma=1.0, lmbda=0.6)
SAM = functools.partial(fsam_optax.sam, rho=0.1)
GSAM = functools.partial(fsam_optax.gsam, rho=0.2, alpha=0.4)
VASSO = functools.partial(fsam_optax.vasso, rho=0.2, theta=0.4)
LOOKSAM = functools.partial(fsam_optax.looksam, rho=0.2, every=2, alpha=0.7)
WSAM = functools.partial(fsam_optax.wsam, rho=0.2, gamma=0.8, learning_rate=0.05)
WSAM_COUPLED = functools.partial(fsam_optax.wsam, rho=0.2, gamma=0.8, decoupled=False)
# big_vision's forms: the clean loss plus the gap, the perturbation relative to the weights.
GSAM_BIG_VISION = functools.partial(
  fsam_optax.gsam, rho=0.2, alpha=0.4, minimize="clean", relative=True
)
METHODS = ["FSAM", "SAM", "GSAM", "VASSO", "LOOKSAM", "WSAM", "WSAM_COUPLED", "GSAM_BIG_VISION"]
BROKEN = pathlib.Path(__file__).with_name("broken_methods.py")


@pytest.mark.parametrize("check", testing.CHECKS)
@pytest.mark.parametrize("method", METHODS)
def test_builtin_method_passes(method, check):
  testing.CHECKS[check](f"tests.test_conformance:{method}")


def test_a_norm_of_the_local_shards_fails_on_the_model_mesh():
  with pytest.raises(AssertionError, match=r"unit_updates: parallel layouts: the 1-D model mesh"):
    testing.check_layouts(f"{BROKEN}:unit_updates")


def test_a_method_that_ignores_a_hyperparameter_fails_inject_hyperparams():
  # Injected, the live rho rules; the plain factory drops it.
  with pytest.raises(AssertionError, match=r"fixed_rho: inject_hyperparams: as given, against"):
    testing.check_inject_hyperparams(f"{BROKEN}:fixed_rho")


def test_a_state_that_changes_type_fails_compiles_once():
  with pytest.raises(AssertionError, match=r"widening_count: the jitted step compiles once: 2"):
    testing.check_compiles_once(f"{BROKEN}:widening_count")


def test_checks_a_factory_cannot_take_are_skipped_with_the_reason():
  bare = lambda: fsam_optax.sam(rho=0.1)
  skipped = {
    "skip_nonfinite": "takes no `skip_nonfinite`",
    "inject_hyperparams": "functools.partial",
    "layouts": "needs an importable spec",
  }
  for name, reason in skipped.items():
    with pytest.raises(unittest.SkipTest, match=reason):
      testing.CHECKS[name](bare)


def test_a_bad_spec_is_refused():
  with pytest.raises(ValueError, match=r"'package\.module:name' or 'file\.py:name'"):
    testing.load_factory("fsam_optax.sam")
