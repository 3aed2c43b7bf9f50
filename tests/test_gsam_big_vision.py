"""GSAM's options for big_vision's forms follow their float64 NumPy statement.

``reference.BigVisionGSAMReference`` states big_vision's ``gsam_gradient`` (one
worker; its trainer averages the results over workers): the default form, the
``minimize_fp=False`` form (``minimize="clean"``) and its adaptive perturbation
(``relative=True``). 32 steps of the MLP on one device, and per worker under
``pmap`` with ``perturbation="per_device"``, then averaged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fsam_optax
from tests import reference as ref
from tests.jax_mlp import max_rel_error, mlp_loss, run_library
from tests.test_family_reference import LR, MOMENTUM, STEPS, WD
from tests.train_step import per_worker_step, replicate

TOL = 1e-9  # the default form: big_vision's norms have no eps (1e-11 apart on this MLP)
FORMS = [
  dict(minimize="perturbed", relative=False),
  dict(minimize="perturbed", relative=True),
  dict(minimize="clean", relative=False),
  dict(minimize="clean", relative=True),
]


def base_optimizer():
  return [optax.add_decayed_weights(WD), optax.sgd(LR, momentum=MOMENTUM)]


def big_vision(form, rho=0.3, alpha=0.6):
  return ref.BigVisionGSAMReference(rho, alpha, form["minimize"] == "perturbed", form["relative"])


@pytest.mark.parametrize("form", FORMS, ids=str)
def test_one_device_equals_big_vision(form):
  with jax.enable_x64(True):
    data = ref.batches(seed=1, steps=STEPS)
    path, _ = run_library(optax.chain(fsam_optax.gsam(0.3, 0.6, **form), *base_optimizer()), data)
    want = ref.train_family(
      big_vision(form), ref.SGDReference(LR, MOMENTUM, WD), ref.init_mlp(0), data
    )
    assert max_rel_error(path, want) < TOL


@pytest.mark.parametrize("form", FORMS[1:], ids=str)
def test_each_form_is_far_from_the_default(form):
  with jax.enable_x64(True):
    data = ref.batches(seed=1, steps=STEPS)
    path, _ = run_library(optax.chain(fsam_optax.gsam(0.3, 0.6, **form), *base_optimizer()), data)
    want = ref.train_family(
      big_vision(FORMS[0]), ref.SGDReference(LR, MOMENTUM, WD), ref.init_mlp(0), data
    )
    assert max_rel_error(path, want) > 1e-3


@pytest.mark.parametrize("form", [FORMS[0], FORMS[3]], ids=str)
def test_per_worker_under_pmap_equals_big_vision_then_pmean(form):
  n, steps = jax.device_count(), 8
  tx = optax.chain(fsam_optax.gsam(0.3, 0.6, **form), *base_optimizer())
  step = per_worker_step(tx, mlp_loss, "data")
  with jax.enable_x64(True):
    data = ref.batches(seed=3, steps=steps, batch=2 * n)
    params = jax.tree.map(jnp.asarray, ref.init_mlp(0))
    params, opt_state = replicate(params, n), replicate(tx.init(params), n)
    theta, base = ref.init_mlp(0), ref.SGDReference(LR, MOMENTUM, WD)
    for x, y in data:
      params, opt_state = step(params, opt_state, x.reshape(n, 2, -1), y.reshape(n, 2, -1))
      workers = [
        big_vision(form).gradient(
          theta,
          lambda w, x=x[2 * i : 2 * i + 2], y=y[2 * i : 2 * i + 2]: ref.mlp_loss_and_grad(w, x, y)[
            1
          ],
        )
        for i in range(n)
      ]
      theta = base.step(theta, {k: np.mean([g[k] for g in workers], axis=0) for k in theta})
      got = jax.tree.map(lambda a: np.asarray(a[0]), params)
      assert max_rel_error([got], [theta]) < TOL


@pytest.mark.parametrize("form", FORMS, ids=str)
def test_a_zero_gradient_stays_finite(form):
  """Where big_vision divides by ||g|| = 0 (NaN), the library hands on zeros."""
  params = {"w": jnp.array([1.0, -2.0]), "b": jnp.zeros(3)}
  tx = optax.chain(fsam_optax.gsam(0.3, 0.6, **form), optax.sgd(0.1))
  grad_fn = fsam_optax.sam_value_and_grad(lambda p: jnp.sum((p["w"] - jnp.array([1.0, -2.0])) ** 2))
  _, grads = grad_fn(params, tx.init(params))
  for leaf in jax.tree.leaves(fsam_optax.base_grads(grads)):
    np.testing.assert_array_equal(leaf, np.zeros_like(leaf))


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(minimize="fp"), r'gsam: `minimize` must be "perturbed" .* or "clean"'),
    (dict(relative=1), r"gsam: `relative` must be a Python bool"),
    (dict(relative=True, adaptive=True), r"two different perturbations; choose one"),
  ],
)
def test_bad_options_are_refused(kwargs, match):
  with pytest.raises(ValueError, match=match):
    fsam_optax.gsam(0.1, 0.4, **kwargs)


def test_relative_perturbation_stays_finite_in_float16():
  """|theta| g in float16 overflows at |theta|, |g| ~ 300: the direction is formed wider."""
  params = {"w": jnp.array([300.0, -200.0], jnp.float16)}
  tx = optax.chain(fsam_optax.gsam(0.01, 0.4, relative=True), optax.sgd(1e-6))
  loss = lambda p: jnp.sum(150.0 * p["w"].astype(jnp.float32) ** 2 / 300.0)  # |g| ~ 300
  _, grads = fsam_optax.sam_value_and_grad(loss)(params, tx.init(params))
  got = fsam_optax.base_grads(grads)["w"]
  assert got.dtype == jnp.float16
  assert np.all(np.isfinite(np.asarray(got, np.float32)))
