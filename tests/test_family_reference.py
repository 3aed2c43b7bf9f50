"""GSAM, VaSSO and LookSAM follow their float64 NumPy references for 32 steps, and their
limiting cases are SAM exactly."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fsam_optax
from tests import reference as ref
from tests.jax_mlp import run_library

STEPS = 32
LR, MOMENTUM, WD = 0.05, 0.9, 1e-3
TOL = 1e-9


def base_optimizer():
  return [optax.add_decayed_weights(WD), optax.sgd(LR, momentum=MOMENTUM)]


def max_rel_error(path, ref_path):
  """Worst ||got - want|| / ||want|| over leaves and steps."""
  worst = 0.0
  for got, want in zip(path, ref_path, strict=True):
    for k, w in want.items():
      worst = max(worst, float(np.linalg.norm(np.asarray(got[k]) - w) / np.linalg.norm(w)))
  return worst


def compare(tx, method, seed=1, rho_at=None, **grad_kwargs):
  """The library's and the reference's worst relative error over STEPS steps."""
  with jax.enable_x64(True):
    data = ref.batches(seed=seed, steps=STEPS)
    path, state = run_library(optax.chain(tx, *base_optimizer()), data, **grad_kwargs)
    assert path[-1]["w0"].dtype == jnp.float64
    want = ref.train_family(
      method, ref.SGDReference(LR, MOMENTUM, WD), ref.init_mlp(0), data, rho_at
    )
    return max_rel_error(path, want), state


GSAM_CASES = [
  dict(rho=0.2, alpha=0.4),
  dict(rho=0.1, alpha=0.1),
  dict(rho=0.3, alpha=1.0),
  dict(rho=0.5, alpha=0.6, adaptive=True),
]


@pytest.mark.parametrize("kw", GSAM_CASES, ids=str)
def test_gsam_equals_reference(kw):
  err, _ = compare(fsam_optax.gsam(**kw), ref.GSAMReference(**kw))
  assert err < TOL


@pytest.mark.parametrize("kw", [dict(rho=0.2, theta=0.4), dict(rho=0.1, theta=0.9)], ids=str)
def test_vasso_equals_reference(kw):
  err, state = compare(fsam_optax.vasso(**kw), ref.VaSSOReference(**kw))
  assert err < TOL
  assert state[0].ema["w0"].dtype == jnp.float64


@pytest.mark.parametrize(
  "kw", [dict(rho=0.2, every=5, alpha=0.7), dict(rho=0.1, every=3, alpha=0.2)], ids=str
)
def test_looksam_equals_reference(kw):
  method = ref.LookSAMReference(rho=kw["rho"], k=kw["every"], alpha=kw["alpha"])
  err, _ = compare(fsam_optax.looksam(**kw), method)
  assert err < TOL


def test_looksam_is_far_from_its_variants():
  """The comparison can tell LookSAM from SAM every k steps and from SAM every step."""
  kw = dict(rho=0.2, every=5, alpha=0.7)
  tx = fsam_optax.looksam(**kw)
  for variant in (ref.LookSAMReference(0.2, 5, 0.0), ref.LookSAMReference(0.2, 1, 0.7)):
    assert compare(tx, variant)[0] > 1e-4


def test_gsam_and_vasso_are_far_from_sam():
  sam = ref.GSAMReference(rho=0.2, alpha=0.0)
  assert compare(fsam_optax.gsam(rho=0.2, alpha=0.4), sam)[0] > 1e-4
  assert compare(fsam_optax.vasso(rho=0.2, theta=0.4), sam)[0] > 1e-4


def test_gsam_rho_schedule_follows_the_learning_rate():
  lr = optax.cosine_decay_schedule(LR, decay_steps=STEPS)
  rho = fsam_optax.gsam_rho_schedule(lr, lr_max=LR, rho_max=0.4, rho_min=0.1)
  with jax.enable_x64(True):
    data = ref.batches(seed=5, steps=STEPS)
    tx = optax.chain(fsam_optax.gsam(rho=rho, alpha=0.3), optax.sgd(lr))
    path, _ = run_library(tx, data)
    # The cosine decay and the proportional rule, written out in NumPy.
    lr_at = lambda t: LR * 0.5 * (1 + np.cos(np.pi * min(t, STEPS) / STEPS))
    rho_at = lambda t: 0.1 + 0.3 * lr_at(t) / LR
    method, theta, want = ref.GSAMReference(rho=0.0, alpha=0.3), ref.init_mlp(0), []
    for t, (x, y) in enumerate(data):
      method.rho = rho_at(t)
      g = method.gradient(theta, lambda w, x=x, y=y: ref.mlp_loss_and_grad(w, x, y)[1])
      theta = {k: theta[k] - lr_at(t) * g[k] for k in theta}
      want.append(theta)
    assert max_rel_error(path, want) < TOL


def test_gsam_rho_schedule_is_rho_max_for_a_constant_learning_rate():
  rho = fsam_optax.gsam_rho_schedule(
    optax.constant_schedule(0.1), lr_max=0.1, lr_min=0.1, rho_max=0.3, rho_min=0.1
  )
  assert [float(rho(t)) for t in (0, 7)] == [pytest.approx(0.3)] * 2


MASK = {"w0": True, "b0": False, "w1": True, "b1": False}


@pytest.mark.parametrize("name", ["gsam", "vasso", "looksam"])
def test_mask_leaves_leaves_out_of_the_perturbation_and_norms(name):
  kept = [k for k, v in MASK.items() if v]
  tx, method = {
    "gsam": (fsam_optax.gsam(0.2, 0.5, mask=MASK), ref.GSAMReference(0.2, 0.5, kept=kept)),
    "vasso": (fsam_optax.vasso(0.2, 0.4, mask=MASK), ref.VaSSOReference(0.2, 0.4, kept=kept)),
    "looksam": (
      fsam_optax.looksam(0.2, every=3, alpha=0.7, mask=MASK),
      ref.LookSAMReference(0.2, 3, 0.7, kept=kept),
    ),
  }[name]
  assert compare(tx, method)[0] < TOL


def run(tx, steps=12, seed=3):
  with jax.enable_x64(True):
    data = ref.batches(seed=seed, steps=steps)
    return run_library(optax.chain(tx, *base_optimizer()), data)[0]


@pytest.mark.parametrize(
  "tx",
  [
    fsam_optax.gsam(rho=0.2, alpha=0.0),
    fsam_optax.vasso(rho=0.2, theta=1.0, eps=1e-12),
    fsam_optax.looksam(rho=0.2, every=1, alpha=0.7),
  ],
  ids=["gsam alpha 0", "vasso theta 1", "looksam every 1"],
)
def test_limiting_case_is_sam_bit_for_bit(tx):
  want = run(fsam_optax.sam(rho=0.2))
  for got, expected in zip(run(tx), want, strict=True):
    for k in expected:
      np.testing.assert_array_equal(got[k], expected[k])


def test_adaptive_gsam_with_alpha_0_is_adaptive_sam_bit_for_bit():
  want = run(fsam_optax.sam(rho=0.5, adaptive=True))
  got = run(fsam_optax.gsam(rho=0.5, alpha=0.0, adaptive=True))
  for g, w in zip(got, want, strict=True):
    for k in w:
      np.testing.assert_array_equal(g[k], w[k])


def test_looksam_takes_one_pass_between_sam_steps():
  """Steps 0, k, 2k perturb; the others report a zero perturbation and the clean loss."""
  tx = optax.chain(fsam_optax.looksam(rho=0.2, every=3), optax.sgd(LR))
  params = jax.tree.map(jnp.asarray, ref.init_mlp(0))
  state = tx.init(params)
  from tests.jax_mlp import mlp_loss

  grad_fn = jax.jit(fsam_optax.sam_value_and_grad(mlp_loss, return_diagnostics=True))
  taken = []
  for x, y in ref.batches(seed=1, steps=7):
    _, grads, diag = grad_fn(params, state, x, y)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    taken.append(bool(diag.perturbation_norm > 0))
    if not taken[-1]:
      assert float(diag.perturbed_value) == float(diag.value)
  assert taken == [True, False, False, True, False, False, True]
