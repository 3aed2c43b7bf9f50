"""fsam_optax follows the official F-SAM code step for step, in float64, for 30+ steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fsam_optax
from tests import reference as ref
from tests.jax_mlp import max_rel_error, run_library
from tests.train_step import sam_step

STEPS = 32
LR, MOMENTUM, WD = 0.05, 0.9, 1e-3


def run_reference(data, seed=0, **fsam_kwargs):
  opt = ref.FSAMReference(**fsam_kwargs)
  base = ref.SGDReference(LR, MOMENTUM, WD)
  return ref.train(opt, base, ref.init_mlp(seed), data)


def base_optimizer():
  return [optax.add_decayed_weights(WD), optax.sgd(LR, momentum=MOMENTUM)]


CASES = [
  dict(rho=0.2, sigma=1.0, lmbda=0.6),
  dict(rho=0.2, sigma=1.0, lmbda=0.95),
  dict(rho=0.1, sigma=0.5, lmbda=0.9),
  dict(rho=0.3, sigma=2.0, lmbda=0.0),
  dict(rho=0.05, sigma=0.0, lmbda=0.9),  # SAM
  dict(rho=0.2, sigma=1.0, lmbda=0.6, adaptive=True),
  dict(rho=0.5, sigma=0.0, lmbda=0.9, adaptive=True),  # adaptive SAM
]


@pytest.mark.parametrize("kwargs", CASES, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_trajectory_equals_numpy_reference(kwargs):
  with jax.enable_x64(True):
    data = ref.batches(seed=1, steps=STEPS)
    tx = optax.chain(fsam_optax.fsam(**kwargs), *base_optimizer())
    path, _ = run_library(tx, data)
    assert path[-1]["w0"].dtype == jnp.float64
    assert max_rel_error(path, run_reference(data, **kwargs)) < 1e-10


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_equals_fsam_with_sigma_zero_and_reference(adaptive):
  with jax.enable_x64(True):
    data = ref.batches(seed=2, steps=STEPS)
    tx = optax.chain(fsam_optax.sam(rho=0.1, adaptive=adaptive), *base_optimizer())
    path, state = run_library(tx, data)
    assert state[0].ema is None
    want = run_reference(data, rho=0.1, sigma=0.0, lmbda=0.9, adaptive=adaptive)
    assert max_rel_error(path, want) < 1e-10


def test_rho_schedule_is_evaluated_at_the_step_being_perturbed():
  schedule = optax.linear_schedule(0.0, 0.4, transition_steps=STEPS)
  with jax.enable_x64(True):
    data = ref.batches(seed=3, steps=STEPS)
    tx = optax.chain(fsam_optax.fsam(rho=schedule, sigma=1.0, lmbda=0.6), *base_optimizer())
    path, _ = run_library(tx, data)
    opt = ref.FSAMReference(rho=0.0, sigma=1.0, lmbda=0.6)
    base = ref.SGDReference(LR, MOMENTUM, WD)
    theta, want = ref.init_mlp(0), []
    for t, batch in enumerate(data):
      opt.rho = float(schedule(t))
      want += ref.train(opt, base, theta, [batch])
      theta = want[-1]
    assert max_rel_error(path, want) < 1e-10


# Each rule of step 2 gets a variant that breaks only that rule; the library
# must match the official code and be measurably far from every variant.
VARIANTS = {
  "ema fed the corrected direction d": dict(ema_feed="d"),
  "paper form: m_0 = 0, new m in d": dict(form="paper"),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_library_is_not_a_variant(variant):
  kwargs = dict(rho=0.2, sigma=1.0, lmbda=0.6)
  with jax.enable_x64(True):
    data = ref.batches(seed=4, steps=STEPS)
    path, _ = run_library(optax.chain(fsam_optax.fsam(**kwargs), *base_optimizer()), data)
    assert max_rel_error(path, run_reference(data, **kwargs)) < 1e-10
    assert max_rel_error(path, run_reference(data, **kwargs, **VARIANTS[variant])) > 1e-4


def first_two_steps(sigma=1.0, lmbda=0.6):
  """The library's state and diagnostics over two steps on fixed gradients."""
  with jax.enable_x64(True):
    params = {"w": jnp.array([1.0, -2.0, 0.5])}
    targets = [jnp.array([3.0, 1.0, -1.0]), jnp.array([-2.0, 4.0, 0.0])]
    loss = lambda p, t: 0.5 * jnp.sum((p["w"] - t) ** 2)  # gradient: w - t
    tx = optax.chain(fsam_optax.fsam(rho=0.3, sigma=sigma, lmbda=lmbda), optax.sgd(0.1))
    step = sam_step(tx, loss, outputs=("diag",), jit=False)
    state, record = tx.init(params), []
    for t in targets:
      clean = params["w"] - t
      params, state, diag = step(params, state, t)
      np.testing.assert_allclose(diag.clean_grad_norm, np.linalg.norm(clean), rtol=1e-15)
      record.append((np.asarray(clean), diag, np.asarray(state[0].ema["w"])))
    return record


def test_step_one_perturbs_along_g_and_sets_m_to_g():
  (g1, diag, m1), _ = first_two_steps()
  np.testing.assert_array_equal(m1, g1)
  np.testing.assert_allclose(diag.direction_norm, np.linalg.norm(g1), rtol=1e-15)


def test_later_steps_use_the_old_ema_in_d_and_feed_raw_g():
  (g1, _, _), (g2, diag, m2) = first_two_steps(sigma=1.0, lmbda=0.6)
  np.testing.assert_allclose(diag.direction_norm, np.linalg.norm(g2 - g1), rtol=1e-14)
  np.testing.assert_allclose(m2, 0.6 * g1 + 0.4 * g2, rtol=1e-14)


def test_hyperparameters_keep_float64_under_x64():
  with jax.enable_x64(True):
    state = fsam_optax.fsam(rho=0.2, sigma=1.0, lmbda=0.6).init({"w": jnp.zeros(2)})
    assert {state.rho.dtype, state.sigma.dtype, state.eps.dtype} == {jnp.dtype("float64")}
  state = fsam_optax.fsam().init({"w": jnp.zeros(2)})
  assert state.rho.dtype == jnp.float32
