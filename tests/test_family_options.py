"""GSAM, VaSSO and LookSAM take the helper's and Optax's options as F-SAM does, and refuse
bad input with errors that name the argument.

Micro-batches, the loss scale, ``skip_nonfinite``, bfloat16 params and checkpoints are
checked for every method by ``fsam_optax.testing`` (``test_conformance.py``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fsam_optax
from tests import reference as ref
from tests.jax_mlp import mlp_loss
from tests.train_step import sam_step

LR = 0.05
BUILD = {
  "gsam": lambda **kw: fsam_optax.gsam(0.2, 0.4, **kw),
  "vasso": lambda **kw: fsam_optax.vasso(0.2, 0.4, **kw),
  "looksam": lambda **kw: fsam_optax.looksam(0.2, every=3, alpha=0.7, **kw),
}
REFERENCE = {
  "gsam": lambda: ref.GSAMReference(0.2, 0.4),
  "vasso": lambda: ref.VaSSOReference(0.2, 0.4),
  "looksam": lambda: ref.LookSAMReference(0.2, 3, 0.7),
}
METHODS = list(BUILD)


def params64():
  return jax.tree.map(jnp.asarray, ref.init_mlp(0))


def trajectory(tx, data, params=None, on_step=None, **grad_kwargs):
  """The params after each step of ``optax.chain(tx, sgd)``, and the final state."""
  chain = optax.chain(tx, optax.sgd(LR))
  params = params64() if params is None else params
  state = chain.init(params)
  step = sam_step(chain, mlp_loss, **grad_kwargs)
  path = []
  for t, (x, y) in enumerate(data):
    if on_step is not None:
      state = on_step(t, state)
    params, state = step(params, state, x, y)
    path.append(params)
  return path, state


def assert_paths_close(got, want, rtol):
  for g, w in zip(got, want, strict=True):
    for k in w:
      np.testing.assert_allclose(np.asarray(g[k]), np.asarray(w[k]), rtol=rtol, atol=0)


@pytest.mark.parametrize("name", METHODS)
def test_inject_hyperparams_follows_a_change_at_the_step_it_is_made(name):
  """Under inject_hyperparams, a hyperparameter set before step 6 rules step 6 on."""
  knob, new = {"gsam": ("alpha", 0.1), "vasso": ("theta", 0.9), "looksam": ("alpha", 0.2)}[name]
  ref_attr = {"gsam": "alpha", "vasso": "theta", "looksam": "alpha"}[name]
  build = {
    "gsam": lambda: optax.inject_hyperparams(fsam_optax.gsam)(rho=0.2, alpha=0.4),
    "vasso": lambda: optax.inject_hyperparams(fsam_optax.vasso)(rho=0.2, theta=0.4),
    "looksam": lambda: optax.inject_hyperparams(fsam_optax.looksam, static_args=("every",))(
      rho=0.2, every=3, alpha=0.7
    ),
  }[name]

  def on_step(t, state):
    if t == 6:
      state[0].hyperparams[knob] = jnp.asarray(new, state[0].hyperparams[knob].dtype)
    return state

  with jax.enable_x64(True):
    data = ref.batches(seed=7, steps=12)
    got, _ = trajectory(build(), data, on_step=on_step)
    method, theta, want = REFERENCE[name](), ref.init_mlp(0), []
    for t, (x, y) in enumerate(data):
      if t == 6:
        setattr(method, ref_attr, new)
      g = method.gradient(theta, lambda w, x=x, y=y: ref.mlp_loss_and_grad(w, x, y)[1])
      theta = {k: theta[k] - LR * g[k] for k in theta}
      want.append(theta)
  assert_paths_close(got, want, rtol=1e-9)


@pytest.mark.parametrize("name", METHODS)
def test_a_rho_schedule_is_evaluated_at_each_step(name):
  schedule = optax.linear_schedule(0.05, 0.4, transition_steps=10)
  tx = {
    "gsam": fsam_optax.gsam(schedule, 0.4),
    "vasso": fsam_optax.vasso(schedule, 0.4),
    "looksam": fsam_optax.looksam(schedule, every=3, alpha=0.7),
  }[name]
  with jax.enable_x64(True):
    data = ref.batches(seed=8, steps=10)
    got, _ = trajectory(tx, data)
    method = REFERENCE[name]()
    base = ref.SGDReference(LR, 0.0, 0.0)
    rho_at = lambda t: 0.05 + 0.35 * t / 10
    want = ref.train_family(method, base, ref.init_mlp(0), data, rho_at)
  assert_paths_close(got, want, rtol=1e-9)


def first_step_diagnostics(name):
  with jax.enable_x64(True):
    params = params64()
    chain = optax.chain(BUILD[name](), optax.sgd(LR))
    grad_fn = fsam_optax.sam_value_and_grad(mlp_loss, return_diagnostics=True)
    x, y = ref.batches(seed=12, steps=1)[0]
    _, grads, diag = grad_fn(params, chain.init(params), x, y)
    loss, g = ref.mlp_loss_and_grad(ref.init_mlp(0), x, y)
    return grads, diag, loss, g


@pytest.mark.parametrize("name", METHODS)
def test_diagnostics_report_the_first_step(name):
  """Step 0 perturbs along g for all three (VaSSO's average starts at g)."""
  _, diag, loss, g = first_step_diagnostics(name)
  np.testing.assert_allclose(float(diag.value), loss, rtol=1e-14)
  np.testing.assert_allclose(float(diag.direction_norm), ref.norm(g), rtol=1e-13)
  n, eps = ref.norm(g), 1e-7 if name == "vasso" else 1e-12
  np.testing.assert_allclose(float(diag.perturbation_norm), 0.2 * n / (n + eps), rtol=1e-13)
  np.testing.assert_allclose(float(diag.clean_grad_norm), ref.norm(g), rtol=1e-13)
  assert float(diag.sharpness) > 0


def test_each_method_hands_on_its_buffer_and_no_other():
  gsam, _, _, g = first_step_diagnostics("gsam")
  vasso = first_step_diagnostics("vasso")[0]
  looksam = first_step_diagnostics("looksam")[0]
  is_pair = lambda x: isinstance(x, fsam_optax.SAMGrad)
  assert all(p.buffer is None for p in jax.tree.leaves(gsam, is_leaf=is_pair))
  # VaSSO hands on its new average, which is g on the first step.
  np.testing.assert_allclose(vasso["w0"].buffer, g["w0"], rtol=1e-13)
  assert all(p.buffer is not None for p in jax.tree.leaves(looksam, is_leaf=is_pair))


def test_gsam_hands_bfloat16_gradients_to_the_base_optimizer():
  params = {"w": jnp.array([1.0, -2.0, 0.5], jnp.bfloat16)}
  chain = optax.chain(fsam_optax.gsam(0.1, 0.5), optax.sgd(LR))
  loss = lambda p: jnp.sum(p["w"].astype(jnp.float32) ** 4)
  _, grads = fsam_optax.sam_value_and_grad(loss)(params, chain.init(params))
  assert fsam_optax.base_grads(grads)["w"].dtype == jnp.bfloat16


@pytest.mark.parametrize(
  ("build", "match"),
  [
    (lambda: fsam_optax.gsam(alpha=-0.1), r"gsam: `alpha` must be in \[0, 1\]"),
    (lambda: fsam_optax.gsam(alpha=1.5), r"gsam: `alpha` must be in \[0, 1\]"),
    (lambda: fsam_optax.gsam(rho=-1.0), r"gsam: `rho` must be a radius >= 0"),
    (lambda: fsam_optax.gsam(eps=0.0), r"gsam: `eps` must be > 0"),
    (lambda: fsam_optax.gsam(alpha=lambda t: 0.1), r"gsam: `alpha` must be a number"),
    (lambda: fsam_optax.vasso(theta=-0.5), r"vasso: `theta` must be in \[0, 1\]"),
    (lambda: fsam_optax.vasso(theta=1.01), r"vasso: `theta` must be in \[0, 1\]"),
    (lambda: fsam_optax.looksam(every=0), r"looksam: `every` must be an integer >= 1"),
    (lambda: fsam_optax.looksam(every=2.5), r"looksam: `every` must be an integer >= 1"),
    (lambda: fsam_optax.looksam(every=True), r"looksam: `every` must be an integer >= 1"),
    (lambda: fsam_optax.looksam(alpha=-1.0), r"looksam: `alpha` must be >= 0"),
  ],
)
def test_bad_hyperparameters_are_refused_by_name(build, match):
  with pytest.raises(ValueError, match=match):
    build()


@pytest.mark.parametrize("name", METHODS)
def test_a_bad_mask_is_refused_by_name(name):
  with pytest.raises(ValueError, match=rf"{name}: `mask` leaves must be concrete Python bools"):
    BUILD[name](mask={"w0": jnp.array([True, False])})
  wrong = BUILD[name](mask={"w9": True})
  with pytest.raises(ValueError, match=rf"{name}: `mask` must have the structure of the params"):
    wrong.init(params64())


@pytest.mark.parametrize(
  ("kwargs", "match"),
  [
    (dict(lr_max=0.1, rho_max=0.1, rho_min=0.5), r"0 <= `rho_min` <= `rho_max`"),
    (dict(lr_max=0.1, rho_max=0.5, rho_min=-0.1), r"0 <= `rho_min` <= `rho_max`"),
    (dict(lr_max=0.01, lr_min=0.1, rho_max=0.5, rho_min=0.1), r"`lr_max` must be >= `lr_min`"),
  ],
)
def test_bad_rho_schedule_bounds_are_refused(kwargs, match):
  with pytest.raises(ValueError, match=match):
    fsam_optax.gsam_rho_schedule(optax.constant_schedule(0.1), **kwargs)


def test_rho_schedule_needs_a_schedule():
  with pytest.raises(ValueError, match=r"`lr_schedule` must be an optax schedule"):
    fsam_optax.gsam_rho_schedule(0.1, lr_max=0.1, rho_max=0.5, rho_min=0.1)


@pytest.mark.parametrize("name", METHODS)
def test_a_method_not_first_in_the_chain_is_named_and_refused(name):
  tx = optax.chain(optax.clip_by_global_norm(1.0), BUILD[name]())
  params = params64()
  with pytest.raises(ValueError, match=rf"{name} must be the first transformation.*position 1"):
    fsam_optax.sam_value_and_grad(lambda p: jnp.sum(p["w0"] ** 2))(params, tx.init(params))


@pytest.mark.parametrize("name", METHODS)
def test_plain_gradients_are_refused_by_name(name):
  tx = optax.chain(BUILD[name](), optax.sgd(LR))
  params = params64()
  grads = jax.tree.map(jnp.zeros_like, params)
  with pytest.raises(ValueError, match=rf"{name} received plain gradients"):
    tx.update(grads, tx.init(params), params)


@pytest.mark.parametrize("name", METHODS)
def test_apply_if_finite_needs_skip_nonfinite_and_says_so_by_name(name):
  tx = optax.chain(BUILD[name](), optax.apply_if_finite(optax.sgd(LR), 3))
  params = params64()
  with pytest.raises(ValueError, match=rf"fsam_optax\.{name}\(\.\.\., skip_nonfinite=True\)"):
    fsam_optax.sam_value_and_grad(lambda p: jnp.sum(p["w0"] ** 2))(params, tx.init(params))


def test_two_methods_in_one_chain_are_refused():
  tx = optax.chain(fsam_optax.gsam(), fsam_optax.vasso(), optax.sgd(LR))
  params = params64()
  with pytest.raises(ValueError, match="exactly one SAM-family transformation"):
    fsam_optax.sam_value_and_grad(lambda p: jnp.sum(p["w0"] ** 2))(params, tx.init(params))
