"""Flax Linen: TrainState takes the helper's gradients; BatchNorm stats come from the clean pass."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from flax.training import train_state

import fsam_optax
from tests import reference as ref
from tests.jax_mlp import max_abs_diff

FSAM = dict(rho=0.2, sigma=1.0, lmbda=0.6)
LR, MOMENTUM = 0.05, 0.9
STEPS = 3


class Net(nn.Module):
  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = nn.Dense(6, param_dtype=jnp.float64)(x)
    x = nn.BatchNorm(use_running_average=not train, param_dtype=jnp.float64)(x)
    return nn.Dense(3, param_dtype=jnp.float64)(jnp.tanh(x))


class TrainState(train_state.TrainState):
  batch_stats: Any


def loss_fn(params, batch_stats, x, y):
  out, updates = Net().apply(
    {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
  )
  return jnp.mean((out - y) ** 2), updates["batch_stats"]


grad_fn = fsam_optax.sam_value_and_grad(loss_fn, has_aux=True)


@jax.jit
def train_step(state: TrainState, x, y) -> TrainState:
  (_, batch_stats), grads = grad_fn(state.params, state.opt_state, state.batch_stats, x, y)
  return state.apply_gradients(grads=grads, batch_stats=batch_stats)


def create_state() -> TrainState:
  variables = jax.jit(Net().init, static_argnames="train")(
    jax.random.key(0), jnp.zeros((1, 5)), train=False
  )
  state = TrainState.create(
    apply_fn=Net().apply,
    params=variables["params"],
    # BatchNorm creates float32 statistics; the first step returns float64.
    batch_stats=jax.tree.map(lambda a: a.astype(jnp.float64), variables["batch_stats"]),
    tx=optax.chain(fsam_optax.fsam(**FSAM), optax.sgd(LR, momentum=MOMENTUM)),
  )
  # A concrete int32 step (not Python's 0), so that step 2 does not recompile.
  return state.replace(step=jnp.zeros([], jnp.int32))


def flat(tree) -> dict:
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


@jax.jit
def flat_grad(flat_params: dict, batch_stats, x, y) -> dict:
  loss = lambda p: loss_fn(traverse_util.unflatten_dict(p, sep="/"), batch_stats, x, y)[0]
  return jax.grad(loss)(flat_params)


def perturbation_by_hand(opt: ref.FSAMReference, state: TrainState, x, y) -> tuple[dict, dict]:
  """F-SAM's e (NumPy, advancing ``opt``'s EMA) and g' (jax.grad), on flat param dicts."""
  # In training mode BatchNorm normalises with the batch's own statistics, so
  # the loss does not depend on the running ones.
  theta = flat(state.params)
  g = flat(flat_grad(theta, state.batch_stats, x, y))
  e = opt.perturbation(theta, opt.direction(g))
  g_p = flat_grad({k: theta[k] + e[k] for k in theta}, state.batch_stats, x, y)
  return e, flat(g_p)


def test_apply_gradients_follows_fsam_then_momentum_sgd():
  with jax.enable_x64(True):
    state = create_state()
    opt, base = ref.FSAMReference(**FSAM), ref.SGDReference(LR, MOMENTUM, weight_decay=0.0)
    theta = flat(state.params)
    for x, y in ref.batches(seed=9, steps=STEPS):
      _, g_p = perturbation_by_hand(opt, state, x, y)
      theta = base.step(theta, g_p)
      state = train_step(state, x, y)
      assert max_abs_diff(flat(state.params), theta) < 1e-12
    assert int(state.step) == STEPS


@jax.jit
def new_stats(params, batch_stats, x, y):
  """The running statistics after one forward pass at ``params``."""
  return loss_fn(params, batch_stats, x, y)[1]


def test_batch_stats_come_from_the_clean_pass_only():
  with jax.enable_x64(True):
    state = create_state()
    opt = ref.FSAMReference(**FSAM)
    for x, y in ref.batches(seed=10, steps=STEPS):
      e, _ = perturbation_by_hand(opt, state, x, y)
      clean = new_stats(state.params, state.batch_stats, x, y)
      perturbed_params = traverse_util.unflatten_dict(
        {k: v + e[k] for k, v in flat(state.params).items()}, sep="/"
      )
      perturbed = new_stats(perturbed_params, state.batch_stats, x, y)
      state = train_step(state, x, y)
      assert max_abs_diff(flat(state.batch_stats), flat(clean)) < 1e-14
      # The statistics of the second pass differ, so the check above can fail.
      assert max_abs_diff(flat(perturbed), flat(clean)) > 1e-5
