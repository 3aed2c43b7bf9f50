"""GSAM, VaSSO and LookSAM on every parallel layout equal one device, step for step.

Each layout trains the same MLP for 5 float64 steps on simulated CPU devices;
its params, optimizer state and losses must match, within 1e-9, one device
running the whole batch (per device: a NumPy loop over the data replicas).
The model-parallel meshes split the hidden units over ``"model"``
(Megatron-style), so the methods' norms and inner products add over split
leaves. ``fsam_optax.testing`` checks the single-process layouts of every
method as built by default (``test_conformance.py``); here they run for
adaptive GSAM, whose per-leaf weights the suite does not vary, and every
method runs in two processes, which run this file as a worker:
``python -m tests.test_family_layouts ADDRESS PROCESS_ID OUT.npz``.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import fsam_optax
from tests import reference as ref
from tests.jax_mlp import fsdp_loss, megatron_loss, mlp_loss
from tests.train_step import sam_step
from tests.two_processes import join, run_two_processes

STEPS, TOL = 5, 1e-9
SIZES, BATCH = (5, 8, 3), 16
LR, MOMENTUM = 0.1, 0.9
HP = {
  "gsam": dict(rho=0.2, alpha=0.4),
  "gsam_adaptive": dict(rho=0.3, alpha=0.5, adaptive=True),
  "vasso": dict(rho=0.2, theta=0.4),
  "looksam": dict(rho=0.2, every=2, alpha=0.7),  # SAM steps 0, 2, 4; one pass at 1, 3
  # Its clip's norm, over every leaf, adds over the model axis (tests/test_wsam.py).
  "wsam_clipped": dict(rho=0.2, gamma=0.9, learning_rate=0.1, max_norm=0.01),
}
BUILD = {
  "gsam": fsam_optax.gsam,
  "gsam_adaptive": fsam_optax.gsam,
  "vasso": fsam_optax.vasso,
  "looksam": fsam_optax.looksam,
  "wsam_clipped": fsam_optax.wsam,
}
# Run in two processes.
METHODS = ["gsam", "gsam_adaptive", "vasso", "looksam"]
# The layouts of a single process that test_conformance.py does not run.
LAYOUT_METHODS = ["gsam_adaptive"]
MODEL_SPECS = {"w0": P(None, "model"), "b0": P("model"), "w1": P("model", None), "b1": P()}
FSDP_SPECS = {"w0": P(None, "data"), "b0": P("data"), "w1": P("data", None), "b1": P()}
TIMEOUT_S = 180


# Leaves out b0, a leaf split over "model", and b1: masked leaves leave the norms of every shard.
MASK = {"w0": True, "b0": False, "w1": True, "b1": False}


def make_tx(name: str, masked: bool = False) -> optax.GradientTransformation:
  mask = dict(mask=MASK) if masked else {}
  return fsam_optax.chain(BUILD[name](**HP[name], **mask), optax.sgd(LR, momentum=MOMENTUM))


def init() -> dict:
  return jax.tree.map(jnp.asarray, ref.init_mlp(0, SIZES))


def data() -> list:
  return ref.batches(seed=21, steps=STEPS, batch=BATCH, sizes=SIZES)


class Run(NamedTuple):
  params: Any
  opt_state: Any
  losses: np.ndarray


def train(step, params, opt_state, place=lambda batch: batch) -> Run:
  losses = []
  for batch in data():
    params, opt_state, loss = step(params, opt_state, *place(batch))
    losses.append(np.asarray(loss))
  return Run(params, opt_state, np.array(losses))


def assert_same_run(got: Run, want: Run) -> None:
  got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
  assert len(got_leaves) == len(want_leaves)
  for g, w in zip(got_leaves, want_leaves, strict=True):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=TOL)


def place_tree(mesh, tree, specs):
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=_is_spec)
  return jax.device_put(tree, jax.tree.broadcast(shardings, tree))


def _is_spec(x: Any) -> bool:
  return isinstance(x, P)


@functools.cache
def single_device(name: str, masked: bool = False) -> Run:
  tx, params = make_tx(name, masked), init()
  return train(sam_step(tx, mlp_loss, outputs=("loss",)), params, tx.init(params))


@functools.cache
def run_shard_map(
  name: str, shape: tuple, names: tuple, perturbation: str = "global", masked: bool = False
) -> Run:
  mesh = jax.make_mesh(shape, names)
  tx, params = make_tx(name, masked), init()
  model_parallel = "model" in names
  specs = MODEL_SPECS if model_parallel else P()
  state_specs = fsam_optax.opt_state_shardings(tx, params, specs)
  data_axis = "data" if "data" in names else None
  grad_kwargs: dict[str, Any] = dict(axis_name=data_axis, perturbation=perturbation)
  if model_parallel:
    grad_kwargs["param_specs"] = MODEL_SPECS
  mapped = functools.partial(
    jax.shard_map,
    mesh=mesh,
    in_specs=(specs, state_specs, P(data_axis), P(data_axis)),
    out_specs=(specs, state_specs, P()),
  )
  loss = megatron_loss if model_parallel else mlp_loss
  step = sam_step(tx, loss, outputs=("loss",), mapped=mapped, **grad_kwargs)
  params = place_tree(mesh, params, specs)
  opt_state = place_tree(mesh, tx.init(params), state_specs)
  run = train(step, params, opt_state, lambda b: place_tree(mesh, b, P(data_axis)))
  if model_parallel:
    assert run.params["w0"].sharding.spec == MODEL_SPECS["w0"]
  return run


@pytest.mark.parametrize("name", LAYOUT_METHODS)
def test_model_parallel_mesh_equals_one_device(name):
  with jax.enable_x64(True):
    assert_same_run(run_shard_map(name, (4,), ("model",)), single_device(name))


@pytest.mark.parametrize("name", LAYOUT_METHODS)
def test_data_by_model_mesh_equals_one_device_on_the_global_batch(name):
  with jax.enable_x64(True):
    assert_same_run(run_shard_map(name, (2, 4), ("data", "model")), single_device(name))


@pytest.mark.parametrize("name", LAYOUT_METHODS)
def test_masked_data_by_model_mesh_equals_one_device(name):
  with jax.enable_x64(True):
    want = single_device(name, masked=True)
    assert_same_run(run_shard_map(name, (2, 4), ("data", "model"), masked=True), want)
    # The mask matters: masked leaves are not perturbed and leave the norms.
    assert np.max(np.abs(want.params["w0"] - single_device(name).params["w0"])) > 1e-5


@pytest.mark.parametrize("name", LAYOUT_METHODS)
def test_pmap_equals_one_device(name):
  n = jax.device_count()
  tx = make_tx(name)
  step = sam_step(
    tx,
    mlp_loss,
    outputs=("loss",),
    mapped=functools.partial(jax.pmap, axis_name="data"),
    jit=False,
    axis_name="data",
  )
  replicate = lambda tree: jax.tree.map(lambda a: jnp.broadcast_to(a, (n, *a.shape)), tree)
  split = lambda batch: tuple(a.reshape(n, -1, a.shape[-1]) for a in batch)
  with jax.enable_x64(True):
    params = init()
    run = train(step, replicate(params), replicate(tx.init(params)), split)
    want = single_device(name)
  # Every device holds the same result (devices on axis 0 of the state, 1 of the losses).
  for leaf in jax.tree.leaves(run[:2]):
    np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[:1], leaf.shape))
  np.testing.assert_array_equal(run.losses, np.broadcast_to(run.losses[:, :1], run.losses.shape))
  first = jax.tree.map(lambda a: a[0], run[:2])
  assert_same_run(Run(*first, run.losses[:, 0]), want)


@pytest.mark.parametrize("name", LAYOUT_METHODS)
def test_fsdp_under_jit_equals_one_device(name):
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  tx = make_tx(name)
  with jax.enable_x64(True), jax.set_mesh(mesh):
    params = init()
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), FSDP_SPECS, is_leaf=_is_spec)
    state_shardings = fsam_optax.opt_state_shardings(tx, params, shardings)
    replicated = NamedSharding(mesh, P())
    step = jax.jit(
      sam_step(tx, fsdp_loss, outputs=("loss",), jit=False),
      out_shardings=(shardings, state_shardings, replicated),
    )
    params = jax.device_put(params, shardings)
    opt_state = jax.device_put(tx.init(params), state_shardings)
    run = train(
      step, params, opt_state, lambda b: jax.device_put(b, NamedSharding(mesh, P("data")))
    )
  # Outside the mesh: single_device is cached, and its arrays must not carry this mesh.
  with jax.enable_x64(True):
    assert_same_run(run, single_device(name))
  assert run.params["w0"].sharding.spec == P(None, "data")


def per_replica_by_hand(name: str, replicas: int) -> Run:
  """Per device in NumPy: each replica combines its own g and g' as GSAM does; the
  combinations are averaged."""
  method = ref.GSAMReference(**HP[name])
  sgd = ref.SGDReference(LR, MOMENTUM, weight_decay=0.0)
  theta, losses = ref.init_mlp(0, SIZES), []
  mean = lambda trees: {k: np.mean([t[k] for t in trees], axis=0) for k in trees[0]}
  for x, y in data():
    shards = list(zip(np.split(x, replicas), np.split(y, replicas), strict=True))
    grad_at = [lambda w, xs=xs, ys=ys: ref.mlp_loss_and_grad(w, xs, ys)[1] for xs, ys in shards]
    losses.append(np.mean([ref.mlp_loss_and_grad(theta, xs, ys)[0] for xs, ys in shards]))
    theta = sgd.step(theta, mean([method.gradient(theta, grad) for grad in grad_at]))
  return Run(theta, (sgd.trace,), np.array(losses))


@pytest.mark.parametrize("name", LAYOUT_METHODS)
def test_data_by_model_mesh_per_device_equals_a_loop_over_replicas(name):
  with jax.enable_x64(True):
    got = run_shard_map(name, (2, 4), ("data", "model"), perturbation="per_device")
    assert_same_run(
      Run(got.params, (got.opt_state[1][0].trace,), got.losses),
      per_replica_by_hand(name, replicas=2),
    )
    # Per device is another algorithm, not a rounding of the global one.
    assert np.max(np.abs(got.params["w0"] - single_device(name).params["w0"])) > 1e-5


def worker(address: str, process_id: int, out: str) -> None:
  """One of two processes: data-parallel under jit and shard_map, each process half a batch."""
  mesh, local_rows = join(address, process_id)
  replicated = NamedSharding(mesh, P())
  results = {}
  for name in METHODS:
    tx = make_tx(name)
    specs = dict(mesh=mesh, in_specs=(P(), P(), P("data"), P("data")), out_specs=P())
    mapped = functools.partial(jax.shard_map, **specs)
    steps = {
      "jit": jax.jit(
        sam_step(tx, mlp_loss, outputs=("loss",), jit=False), out_shardings=replicated
      ),
      "shard_map": sam_step(tx, mlp_loss, outputs=("loss",), mapped=mapped, axis_name="data"),
    }
    for layout, step in steps.items():
      params = jax.device_put(init(), replicated)
      run = train(step, params, jax.device_put(tx.init(params), replicated), local_rows)
      leaves = jax.tree.leaves(run)
      results |= {f"{name}/{layout}/{i}": np.asarray(leaf) for i, leaf in enumerate(leaves)}
  np.savez(out, **results)
  jax.distributed.shutdown()


def test_two_processes_train_like_one():
  # Each process feeds its half of every batch; every method, under jit and under
  # shard_map, must give in both processes what one device gives, within 1e-9.
  results = run_two_processes("tests.test_family_layouts", TIMEOUT_S)
  for name in METHODS:
    with jax.enable_x64(True):
      want = jax.tree.leaves(single_device(name))
    for result in results:
      for layout in ("jit", "shard_map"):
        got = [result[f"{name}/{layout}/{i}"] for i in range(len(want))]
        for g, w in zip(got, want, strict=True):
          np.testing.assert_allclose(g, np.asarray(w), rtol=0, atol=TOL)
  assert len(results[0]) == 2 * sum(len(jax.tree.leaves(single_device(n))) for n in METHODS)


if __name__ == "__main__":
  worker(sys.argv[1], int(sys.argv[2]), sys.argv[3])
