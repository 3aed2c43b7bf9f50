"""On 8 (simulated CPU) devices, F-SAM gives the single-device result on the global batch.

``pmap``, ``shard_map`` and a batch-sharded ``jit`` are each checked over a few
float64 steps against one device running the whole batch. The
``"per_device"`` mode (m-sharpness) is checked against a NumPy computation,
shard by shard.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import fsam_optax
from tests import reference as ref
from tests.jax_mlp import max_abs_diff, mlp_loss

N_DEV = 8
STEPS = 3
LR = 0.1
FSAM = dict(rho=0.2, sigma=1.0, lmbda=0.6)
TOL = 1e-12  # float64; only the order of the cross-device sums differs


def make_tx(sam: bool = False) -> optax.GradientTransformation:
  first = fsam_optax.sam(FSAM["rho"]) if sam else fsam_optax.fsam(**FSAM)
  return optax.chain(first, optax.sgd(LR))


def make_step(tx, **grad_kwargs):
  grad_fn = fsam_optax.sam_value_and_grad(mlp_loss, **grad_kwargs)

  def step(params, opt_state, x, y):
    loss, grads = grad_fn(params, opt_state, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def data() -> list:
  # Two examples per device: each shard's mean loss is part of the global mean.
  # NumPy float64 arrays, so the NumPy reference sees them unrounded.
  return ref.batches(seed=8, steps=STEPS, batch=2 * N_DEV)


def init(sam: bool = False) -> tuple[dict, optax.OptState]:
  params = jax.tree.map(jnp.asarray, ref.init_mlp(0))
  return params, make_tx(sam).init(params)


@functools.cache  # several tests compare with the same runs; all run in float64
def single_device() -> list[dict]:
  step = jax.jit(make_step(make_tx()))
  params, opt_state = init()
  path = []
  for x, y in data():
    params, opt_state, _ = step(params, opt_state, x, y)
    path.append(params)
  return path


@functools.cache
def per_shard_by_hand(sam: bool = False) -> list[dict]:
  """m-sharpness in NumPy: each shard perturbs along its own d; g' is their mean."""
  opt = ref.FSAMReference(**{**FSAM, "sigma": 0.0} if sam else FSAM)
  theta, path = ref.init_mlp(0), []
  for x, y in data():
    shards = list(zip(np.split(x, N_DEV), np.split(y, N_DEV), strict=True))
    local = [ref.mlp_loss_and_grad(theta, xs, ys)[1] for xs, ys in shards]
    g_perturbed = []
    for (xs, ys), g in zip(shards, local, strict=True):
      d = g if opt.m is None else {k: g[k] - opt.sigma * opt.m[k] for k in g}
      e = opt.perturbation(theta, d)
      g_perturbed.append(ref.mlp_loss_and_grad({k: theta[k] + e[k] for k in theta}, xs, ys)[1])
    opt.direction({k: np.mean([g[k] for g in local], axis=0) for k in theta})  # the EMA sees mean g
    theta = {k: theta[k] - LR * np.mean([g[k] for g in g_perturbed], axis=0) for k in theta}
    path.append(theta)
  return path


def replicate(tree):
  return jax.tree.map(lambda a: jnp.broadcast_to(a, (N_DEV, *jnp.shape(a))), tree)


@functools.cache
def run_pmap(perturbation: str, sam: bool = False) -> list[dict]:
  step = jax.pmap(make_step(make_tx(sam), axis_name="batch", perturbation=perturbation), "batch")
  params, opt_state = map(replicate, init(sam))
  path = []
  for x, y in data():
    x, y = (a.reshape(N_DEV, -1, a.shape[-1]) for a in (x, y))
    params, opt_state, _ = step(params, opt_state, x, y)
    # Every device must hold the same weights, or the replicas have drifted.
    for leaf in jax.tree.leaves(params):
      np.testing.assert_array_equal(leaf, jnp.broadcast_to(leaf[0], leaf.shape))
    path.append(jax.tree.map(lambda a: a[0], params))
  return path


@functools.cache
def run_shard_map(perturbation: str, sam: bool = False) -> list[dict]:
  mesh = jax.make_mesh((N_DEV,), ("batch",))
  step = jax.jit(
    jax.shard_map(
      make_step(make_tx(sam), axis_name="batch", perturbation=perturbation),
      mesh=mesh,
      in_specs=(P(), P(), P("batch"), P("batch")),
      out_specs=(P(), P(), P()),
    )
  )
  params, opt_state = init(sam)
  path = []
  for x, y in data():
    x, y = jax.device_put((x, y), NamedSharding(mesh, P("batch")))
    params, opt_state, _ = step(params, opt_state, x, y)
    path.append(params)
  return path


def test_eight_devices_are_simulated():
  assert jax.device_count() == N_DEV


@pytest.mark.parametrize("run", [run_pmap, run_shard_map], ids=["pmap", "shard_map"])
def test_global_perturbation_equals_single_device_on_global_batch(run):
  with jax.enable_x64(True):
    want = single_device()
    got = run("global")
  for g, w in zip(got, want, strict=True):
    assert max_abs_diff(g, w) < TOL


@pytest.mark.parametrize("sam", [False, True], ids=["fsam", "sam"])
@pytest.mark.parametrize("run", [run_pmap, run_shard_map], ids=["pmap", "shard_map"])
def test_per_device_perturbation_equals_per_shard_computation(run, sam):
  with jax.enable_x64(True):
    got = run("per_device", sam)
    global_path = run("global", sam)
  for g, w in zip(got, per_shard_by_hand(sam), strict=True):
    assert max_abs_diff(g, w) < TOL
  # m-sharpness is a different algorithm, not a rounding of the global one.
  assert max_abs_diff(got[-1], global_path[-1]) > 1e-4


def test_sharded_jit_equals_single_device_and_compiles_once():
  mesh = jax.make_mesh((N_DEV,), ("batch",))
  traces = 0
  inner = make_step(make_tx())

  def counted(*args):
    nonlocal traces
    traces += 1
    return inner(*args)

  step = jax.jit(counted)
  with jax.enable_x64(True):
    want = single_device()
    # Replicated, spelt as jit spells its outputs' sharding (P(None, None) for
    # a matrix, not P()), so that step 2's inputs match step 1's exactly.
    params, opt_state = jax.tree.map(
      lambda a: jax.device_put(a, NamedSharding(mesh, P(*(None,) * a.ndim))), init()
    )
    for (x, y), w in zip(data(), want, strict=True):
      x, y = jax.device_put((x, y), NamedSharding(mesh, P("batch")))
      params, opt_state, _ = step(params, opt_state, x, y)
      assert max_abs_diff(params, w) < TOL
  assert x.sharding.num_devices == N_DEV
  # One trace and one compiled executable: steps 2 and 3 reuse step 1's.
  assert traces == 1
  assert step._cache_size() == 1
