"""Flax: a Linen ``TrainState`` and an NNX ``nnx.Optimizer`` take the helper's gradients,
and BatchNorm's running statistics come from the clean pass.

The Linen step is checked against F-SAM in NumPy; the NNX step, as the README shows it,
against the same maths written as a pure JAX function of a dict of arrays.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, traverse_util
from flax.training import train_state

import fsam_optax
from tests import reference as ref
from tests.jax_mlp import max_abs_diff
from tests.train_step import sam_step

FSAM = dict(rho=0.2, sigma=1.0, lmbda=0.6)
LR, MOMENTUM = 0.05, 0.9
STEPS = 3


def make_tx() -> optax.GradientTransformation:
  return optax.chain(fsam_optax.fsam(**FSAM), optax.sgd(LR, momentum=MOMENTUM))


# ---- Linen ----


class LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = nn.Dense(6, param_dtype=jnp.float64)(x)
    x = nn.BatchNorm(use_running_average=not train, param_dtype=jnp.float64)(x)
    return nn.Dense(3, param_dtype=jnp.float64)(jnp.tanh(x))


class TrainState(train_state.TrainState):
  batch_stats: Any


def linen_loss(params, batch_stats, x, y):
  out, updates = LinenNet().apply(
    {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
  )
  return jnp.mean((out - y) ** 2), updates["batch_stats"]


grad_fn = fsam_optax.sam_value_and_grad(linen_loss, has_aux=True)


@jax.jit
def linen_step(state: TrainState, x, y) -> TrainState:
  (_, batch_stats), grads = grad_fn(state.params, state.opt_state, state.batch_stats, x, y)
  return state.apply_gradients(grads=grads, batch_stats=batch_stats)


def create_state() -> TrainState:
  variables = jax.jit(LinenNet().init, static_argnames="train")(
    jax.random.key(0), jnp.zeros((1, 5)), train=False
  )
  state = TrainState.create(
    apply_fn=LinenNet().apply,
    params=variables["params"],
    # BatchNorm creates float32 statistics; the first step returns float64.
    batch_stats=jax.tree.map(lambda a: a.astype(jnp.float64), variables["batch_stats"]),
    tx=make_tx(),
  )
  # A concrete int32 step (not Python's 0), so that step 2 does not recompile.
  return state.replace(step=jnp.zeros([], jnp.int32))


def flat(tree) -> dict:
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


@jax.jit
def flat_grad(flat_params: dict, batch_stats, x, y) -> dict:
  loss = lambda p: linen_loss(traverse_util.unflatten_dict(p, sep="/"), batch_stats, x, y)[0]
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
      state = linen_step(state, x, y)
      assert max_abs_diff(flat(state.params), theta) < 1e-12
    assert int(state.step) == STEPS


@jax.jit
def new_stats(params, batch_stats, x, y):
  """The running statistics after one forward pass at ``params``."""
  return linen_loss(params, batch_stats, x, y)[1]


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
      state = linen_step(state, x, y)
      assert max_abs_diff(flat(state.batch_stats), flat(clean)) < 1e-14
      # The statistics of the second pass differ, so the check above can fail.
      assert max_abs_diff(flat(perturbed), flat(clean)) > 1e-5


# ---- NNX ----

BN_MOMENTUM, BN_EPS = 0.99, 1e-5  # nnx.BatchNorm's defaults


class NNXNet(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.linear1 = nnx.Linear(5, 6, param_dtype=jnp.float64, rngs=rngs)
    self.bn = nnx.BatchNorm(6, param_dtype=jnp.float64, rngs=rngs)
    self.linear2 = nnx.Linear(6, 3, param_dtype=jnp.float64, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.linear2(jnp.tanh(self.bn(self.linear1(x))))


def nnx_loss(params, graphdef, rest, x, y):
  # copy=True: the forward pass writes BatchNorm statistics, which must go
  # into fresh Variables, not into the model's own from outside this trace.
  model = nnx.merge(graphdef, params, rest, copy=True)
  loss = jnp.mean((model(x) - y) ** 2)
  return loss, nnx.state(model, nnx.BatchStat)


nnx_grad_fn = fsam_optax.sam_value_and_grad(nnx_loss, has_aux=True)


@nnx.jit
def nnx_step(model: NNXNet, optimizer: nnx.Optimizer, x, y) -> jax.Array:
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  (loss, stats), grads = nnx_grad_fn(params, optimizer.opt_state, graphdef, rest, x, y)
  nnx.update(model, stats)
  optimizer.update(model, grads)
  return loss


def pre_norm(params: dict, x):
  return x @ params["linear1"]["kernel"] + params["linear1"]["bias"][None]


def pure_loss(params: dict, x, y):
  """The same network as ``NNXNet`` in training mode, on a dict of arrays."""
  h = pre_norm(params, x)
  h = (h - h.mean(0, keepdims=True)) / jnp.sqrt(h.var(0, keepdims=True) + BN_EPS)
  h = h * params["bn"]["scale"][None] + params["bn"]["bias"][None]
  out = jnp.tanh(h) @ params["linear2"]["kernel"] + params["linear2"]["bias"][None]
  return jnp.mean((out - y) ** 2)


def new_model() -> NNXNet:
  model = NNXNet(nnx.Rngs(0))
  # nnx.BatchNorm makes float32 statistics; keep them in float64 throughout.
  for stat in (model.bn.mean, model.bn.var):
    stat.set_value(stat.get_value().astype(jnp.float64))
  return model


def test_nnx_step_equals_pure_jax_step():
  with jax.enable_x64(True):
    data = ref.batches(seed=11, steps=STEPS)
    model = new_model()
    optimizer = nnx.Optimizer(model, make_tx(), wrt=nnx.Param)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tx = make_tx()
    opt_state = tx.init(params)
    pure_step = sam_step(tx, pure_loss, outputs=("loss",))
    for x, y in data:
      nnx_loss_value = nnx_step(model, optimizer, x, y)
      params, opt_state, loss = pure_step(params, opt_state, x, y)
      np.testing.assert_allclose(nnx_loss_value, loss, rtol=1e-13)
      got = nnx.to_pure_dict(nnx.state(model, nnx.Param))
      flat = traverse_util.flatten_dict
      assert max_abs_diff(flat(got), flat(params)) < 1e-12
    # The optimizer's F-SAM state advanced once per step (it was fed every step).
    assert int(optimizer.opt_state[0].count.get_value()) == STEPS


def running_stats(params: dict, old: tuple, x) -> tuple:
  """BatchNorm's (mean, var) after one training-mode pass at ``params``."""
  h = pre_norm(params, x)
  batch = (h.mean(0), h.var(0))
  return tuple(BN_MOMENTUM * o + (1 - BN_MOMENTUM) * b for o, b in zip(old, batch, strict=True))


def test_nnx_batch_stats_come_from_the_clean_pass_only():
  with jax.enable_x64(True):
    model = new_model()
    optimizer = nnx.Optimizer(model, make_tx(), wrt=nnx.Param)
    opt = ref.FSAMReference(**FSAM)
    loss = lambda p, x, y: pure_loss(traverse_util.unflatten_dict(p), x, y)
    flat_grad = jax.jit(jax.grad(loss))
    for x, y in ref.batches(seed=12, steps=STEPS):
      theta = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
      old = (model.bn.mean.get_value(), model.bn.var.get_value())
      g = {k: np.asarray(v) for k, v in flat_grad(theta, x, y).items()}
      e = opt.perturbation({k: np.asarray(v) for k, v in theta.items()}, opt.direction(g))
      clean = running_stats(traverse_util.unflatten_dict(theta), old, x)
      perturbed = running_stats(
        traverse_util.unflatten_dict({k: theta[k] + e[k] for k in theta}), old, x
      )
      nnx_step(model, optimizer, x, y)
      got = (model.bn.mean.get_value(), model.bn.var.get_value())
      for got_stat, clean_stat, perturbed_stat in zip(got, clean, perturbed, strict=True):
        np.testing.assert_allclose(got_stat, clean_stat, rtol=1e-13, atol=1e-15)
        # The perturbed pass would give other statistics, so the check can fail.
        assert float(jnp.max(jnp.abs(perturbed_stat - clean_stat))) > 1e-6


class SmallNet(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.linear = nnx.Linear(5, 6, rngs=rngs)
    self.bn = nnx.BatchNorm(6, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.bn(self.linear(x))


def test_callable_mask_is_resolved_on_the_nnx_state_at_init():
  """Optax's masking convention on NNX params: BatchNorm's scale and bias stay unperturbed."""
  not_bn = lambda params: jax.tree_util.tree_map_with_path(
    lambda path, _: "bn" not in jax.tree_util.keystr(path), params
  )
  model = SmallNet(nnx.Rngs(0))
  tx = optax.chain(fsam_optax.fsam(**FSAM, mask=not_bn), optax.sgd(LR))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  x = jax.random.normal(jax.random.key(1), (8, 5))
  (_, _), grads = nnx_grad_fn(params, optimizer.opt_state, graphdef, rest, x, jnp.zeros((8, 6)))
  # By hand: step 1 perturbs along g, over the non-BatchNorm leaves only.
  # The moving average handed to the state is g on the first step (m_1 = g).
  g = jax.tree.map(lambda p: p.buffer, grads, is_leaf=lambda x: isinstance(x, fsam_optax.SAMGrad))
  keep = not_bn(g)
  n = jnp.sqrt(
    sum(jnp.sum(v**2) for v, k in zip(jax.tree.leaves(g), jax.tree.leaves(keep), strict=True) if k)
  )
  e = jax.tree.map(lambda v, k: FSAM["rho"] * v / n if k else jnp.zeros_like(v), g, keep)
  moved = jax.tree.map(jnp.add, params, e)
  want = jax.grad(lambda p: nnx_loss(p, graphdef, rest, x, jnp.zeros((8, 6)))[0])(moved)
  for got, expected in zip(
    jax.tree.leaves(fsam_optax.base_grads(grads)), jax.tree.leaves(want), strict=True
  ):
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
  assert optimizer.opt_state[0].config.mask == tuple(jax.tree.leaves(keep))
  assert optimizer.opt_state[0].config.mask.count(False) == 2  # BatchNorm's scale and bias
  optimizer.update(model, grads)  # and the optimizer takes the pairs
