"""Any Optax optimizer can follow fsam in the chain and receives exactly g'.

Each case trains the NumPy reference MLP for a few float64 steps and compares
the weights after every step with the base optimizer's update rule written out
by hand, applied to the g' of an independent NumPy F-SAM.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fsam_optax
from tests import reference as ref
from tests.jax_mlp import max_abs_diff, mlp_loss, perturbed_grad, run_library
from tests.train_step import sam_step

STEPS = 8
LR = 0.05
FSAM = dict(rho=0.2, sigma=1.0, lmbda=0.6)


class LionByHand:
  """optax.lion: sign of an interpolated momentum, plus decoupled weight decay."""

  def __init__(self, lr, b1=0.9, b2=0.99, wd=1e-3):
    self.lr, self.b1, self.b2, self.wd = lr, b1, b2, wd
    self.mu = None

  def step(self, theta, g):
    if self.mu is None:
      self.mu = {k: np.zeros_like(v) for k, v in g.items()}
    u = {k: np.sign(self.b1 * self.mu[k] + (1 - self.b1) * g[k]) for k in g}
    self.mu = {k: self.b2 * self.mu[k] + (1 - self.b2) * g[k] for k in g}
    return {k: theta[k] - self.lr * (u[k] + self.wd * theta[k]) for k in theta}


class ClipThenSGDByHand:
  """optax.clip_by_global_norm then plain SGD; counts the steps that clipped."""

  def __init__(self, lr, max_norm):
    self.lr, self.max_norm, self.clipped_steps = lr, max_norm, 0

  def step(self, theta, g):
    norm = np.sqrt(sum(np.sum(v**2) for v in g.values()))
    self.clipped_steps += int(norm > self.max_norm)
    scale = min(1.0, self.max_norm / norm)
    return {k: theta[k] - self.lr * scale * g[k] for k in theta}


class MaskedDecaySGDByHand:
  """Weight decay on the weight matrices only (not the biases), then momentum SGD."""

  def __init__(self, lr, wd):
    self.sgd = ref.SGDReference(lr, momentum=0.9, weight_decay=0.0)
    self.wd = wd

  def step(self, theta, g):
    decayed = {k: g[k] + (self.wd * theta[k] if k.startswith("w") else 0.0) for k in g}
    return self.sgd.step(theta, decayed)


def is_pair(x) -> bool:
  return isinstance(x, fsam_optax.SAMGrad)


def weights_only(params):
  return {k: k.startswith("w") for k in params}


# name: (base optimizer after fsam, its update rule by hand)
CASES = {
  "sgd-momentum": (
    lambda: optax.sgd(LR, momentum=0.9),
    lambda: ref.SGDReference(LR, momentum=0.9, weight_decay=0.0),
  ),
  "adamw": (
    lambda: optax.adamw(1e-2, weight_decay=1e-2),
    lambda: ref.AdamReference(1e-2, wd=1e-2),
  ),
  "lion": (
    lambda: optax.lion(1e-3, weight_decay=1e-2),
    lambda: LionByHand(1e-3, wd=1e-2),
  ),
  # max_norm is below the gradients' norm so that clipping acts (checked below).
  "clip_by_global_norm": (
    lambda: optax.chain(optax.clip_by_global_norm(0.2), optax.sgd(0.5)),
    lambda: ClipThenSGDByHand(0.5, max_norm=0.2),
  ),
  "inject_hyperparams": (
    lambda: optax.inject_hyperparams(optax.sgd)(learning_rate=LR, momentum=0.9),
    lambda: ref.SGDReference(LR, momentum=0.9, weight_decay=0.0),
  ),
  "masked-weight-decay": (
    lambda: optax.chain(
      optax.add_decayed_weights(0.05, mask=weights_only), optax.sgd(LR, momentum=0.9)
    ),
    lambda: MaskedDecaySGDByHand(LR, wd=0.05),
  ),
}


@pytest.mark.parametrize("name", CASES)
def test_base_optimizer_receives_fsam_gradient_and_trains(name):
  make_base, make_by_hand = CASES[name]
  # The same batch every step, so that the loss must go down.
  data = ref.batches(seed=5, steps=1) * STEPS
  with jax.enable_x64(True):
    path, _ = run_library(optax.chain(fsam_optax.fsam(**FSAM), make_base()), data)
  opt, base = ref.FSAMReference(**FSAM), make_by_hand()
  theta = ref.init_mlp(0)
  for (x, y), got in zip(data, path, strict=True):
    theta = base.step(theta, perturbed_grad(opt, theta, x, y))
    assert got["w0"].dtype == jnp.float64
    assert max_abs_diff(got, theta) < 1e-12
  assert getattr(base, "clipped_steps", 1) > 0
  loss = lambda p: ref.mlp_loss_and_grad(p, *data[0])[0]
  assert loss(theta) < 0.99 * loss(ref.init_mlp(0))


def test_injected_learning_rate_change_takes_effect_and_ema_still_advances():
  tx = optax.chain(fsam_optax.fsam(**FSAM), optax.inject_hyperparams(optax.sgd)(learning_rate=LR))
  x, y = (jnp.asarray(a, jnp.float32) for a in ref.batches(seed=7, steps=1)[0])
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), ref.init_mlp(0))
  opt_state = tx.init(params)
  opt_state[1].hyperparams["learning_rate"] = jnp.zeros([])
  step = sam_step(tx, mlp_loss, outputs=("updates",))
  clean = jax.grad(mlp_loss)(params, x, y)
  _, opt_state, updates = step(params, opt_state, x, y)
  # A zero learning rate gives exactly zero updates, and fsam still saw g.
  assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
  assert int(opt_state[0].count) == 1
  assert max_abs_diff(opt_state[0].ema, clean) < 1e-6
