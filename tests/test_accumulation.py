"""Gradient accumulation: ``optax.MultiSteps`` after fsam, never around it.

Each micro-batch is perturbed with its own gradient and feeds the moving
average; the base optimizer steps once per k micro-batches with the mean g',
and the chain gives exact zeros in between.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fsam_optax
from tests import reference as ref
from tests.jax_mlp import max_abs_diff, mlp_loss, perturbed_grad
from tests.train_step import sam_step

FSAM = dict(rho=0.2, sigma=1.0, lmbda=0.6)
LR, MOMENTUM = 0.05, 0.9
K = 2
MICRO_STEPS = 3 * K


def test_multisteps_after_fsam_steps_every_k_micro_batches_with_mean_perturbed_gradient():
  data = ref.batches(seed=13, steps=MICRO_STEPS, batch=8)
  opt, sgd = ref.FSAMReference(**FSAM), ref.SGDReference(LR, MOMENTUM, weight_decay=0.0)
  theta, pending = ref.init_mlp(0), []
  with jax.enable_x64(True):
    # MultiSteps accumulates in float32 unless told otherwise (and
    # canonicalises float64 to float32 outside the x64 context).
    base = optax.MultiSteps(
      optax.sgd(LR, momentum=MOMENTUM), every_k_schedule=K, accumulator_dtype=jnp.float64
    )
    tx = optax.chain(fsam_optax.fsam(**FSAM), base.gradient_transformation())
    step = sam_step(tx, mlp_loss, outputs=("updates",))
    params = jax.tree.map(jnp.asarray, theta)
    opt_state = tx.init(params)
    for i, (x, y) in enumerate(data, start=1):
      params, opt_state, updates = step(params, opt_state, x, y)
      # By hand: every micro-batch is perturbed at the same theta and feeds the EMA.
      pending.append(perturbed_grad(opt, theta, x, y))
      if i % K:
        assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
      else:
        theta = sgd.step(theta, {k: np.mean([g[k] for g in pending], axis=0) for k in theta})
        pending = []
        assert any(bool(jnp.any(u != 0)) for u in jax.tree.leaves(updates))
      assert max_abs_diff(params, theta) < 1e-12
    assert int(opt_state[0].count) == MICRO_STEPS


def test_multisteps_around_fsam_raises_with_the_fix():
  tx = optax.MultiSteps(optax.chain(fsam_optax.fsam(), optax.sgd(LR)), every_k_schedule=K)
  params = jax.tree.map(jnp.asarray, ref.init_mlp(0))
  x, y = ref.batches(seed=14, steps=1)[0]
  grad_fn = fsam_optax.sam_value_and_grad(mlp_loss)
  with pytest.raises(ValueError, match=r"inside optax\.MultiSteps.*gradient_transformation\(\)"):
    grad_fn(params, tx.init(params), x, y)
