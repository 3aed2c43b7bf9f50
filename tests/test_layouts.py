"""F-SAM on every parallel layout equals its reference, step for step.

Each layout trains the same MLP for 5 float64 steps on 8 simulated CPU
devices. Its params, optimizer state and losses must match, within 1e-9, one
device running the whole batch (or, for m-sharpness, a NumPy loop over the
data replicas). The model-parallel layouts split the MLP Megatron-style: the
hidden units over ``"model"``, with a ``psum`` after the second matmul.
"""

from __future__ import annotations

import functools
import tempfile
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import fsam_optax
from fsam_optax._layout import manual_axes, varying_axes
from tests import reference as ref
from tests.jax_mlp import mlp_loss

STEPS = 5
TOL = 1e-9
SIZES = (5, 8, 3)
BATCH = 16
FSAM = dict(rho=0.2, sigma=1.0, lmbda=0.6)
LR, MOMENTUM = 0.1, 0.9
AUTO, EXPLICIT = AxisType.Auto, AxisType.Explicit
# Megatron-style: hidden units split over "model"; the output bias replicated.
MODEL_SPECS = {"w0": P(None, "model"), "b0": P("model"), "w1": P("model", None), "b1": P()}
# FSDP: every large leaf split over the data axis; jit gathers it for the matmuls.
FSDP_SPECS = {"w0": P(None, "data"), "b0": P("data"), "w1": P("data", None), "b1": P()}


def megatron_loss(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
  h = jnp.tanh(x @ params["w0"] + params["b0"][None, :])
  out = jax.lax.psum(h @ params["w1"], "model") + params["b1"][None, :]
  return jnp.mean((out - y) ** 2)


def fsdp_loss(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
  # The all-gather of FSDP, which an Explicit mesh wants spelt out.
  return mlp_loss(jax.tree.map(lambda w: jax.sharding.reshard(w, P()), params), x, y)


def make_tx(adaptive: bool = False) -> optax.GradientTransformation:
  return optax.chain(fsam_optax.fsam(**FSAM, adaptive=adaptive), optax.sgd(LR, momentum=MOMENTUM))


def make_step(loss, tx, **grad_kwargs):
  grad_fn = fsam_optax.sam_value_and_grad(loss, return_diagnostics=True, **grad_kwargs)

  def step(params, opt_state, x, y):
    value, grads, diag = grad_fn(params, opt_state, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    # Both norms of the diagnostics, shaped (2,) so that shard_map can also
    # return them once per data replica.
    norm = jnp.stack([diag.direction_norm, diag.perturbation_norm])
    return optax.apply_updates(params, updates), opt_state, value, norm

  return step


def init() -> dict:
  return jax.tree.map(jnp.asarray, ref.init_mlp(0, SIZES))


def data() -> list:
  return ref.batches(seed=21, steps=STEPS, batch=BATCH, sizes=SIZES)


class Run(NamedTuple):
  params: Any
  opt_state: Any
  losses: np.ndarray
  norms: np.ndarray


def train(step, params, opt_state, place=lambda batch: batch) -> Run:
  losses, norms = [], []
  for batch in data():
    params, opt_state, loss, norm = step(params, opt_state, *place(batch))
    losses.append(np.asarray(loss))
    norms.append(np.asarray(norm))
  return Run(params, opt_state, np.array(losses), np.array(norms))


def assert_close(got: Any, want: Any) -> None:
  got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
  assert len(got_leaves) == len(want_leaves)
  for g, w in zip(got_leaves, want_leaves, strict=True):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=TOL)


def assert_same_run(got: Run, want: Run, norms: bool = True) -> None:
  assert_close((got.params, got.opt_state, got.losses), (want.params, want.opt_state, want.losses))
  if norms:
    assert_close(got.norms, want.norms)


def mesh_of(shape: tuple, names: tuple, axis_type: AxisType) -> jax.sharding.Mesh:
  return jax.make_mesh(shape, names, axis_types=(axis_type,) * len(names))


def place_tree(mesh, tree, specs):
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=_is_spec)
  return jax.device_put(tree, jax.tree.broadcast(shardings, tree))


def _is_spec(x: Any) -> bool:
  return isinstance(x, P)


@functools.cache
def single_device(adaptive: bool = False) -> Run:
  tx = make_tx(adaptive)
  params = init()
  return train(jax.jit(make_step(mlp_loss, tx)), params, tx.init(params))


@functools.cache
def run_shard_map(
  shape: tuple,
  names: tuple,
  axis_type: AxisType = EXPLICIT,
  perturbation: str = "global",
  adaptive: bool = False,
  micro_batches: int | None = None,
) -> Run:
  """shard_map over a mesh with a "model" axis (params split) and/or a "data" axis (batch split)."""
  mesh = mesh_of(shape, names, axis_type)
  model_parallel = "model" in names
  tx = make_tx(adaptive)
  params = init()
  specs = MODEL_SPECS if model_parallel else P()
  state_specs = fsam_optax.opt_state_shardings(tx, params, specs)
  data_axis = "data" if "data" in names else None
  batch_spec = P(data_axis)
  grad_kwargs = dict(axis_name=data_axis, perturbation=perturbation, micro_batches=micro_batches)
  if model_parallel:
    grad_kwargs["param_specs"] = MODEL_SPECS
  step = make_step(megatron_loss if model_parallel else mlp_loss, tx, **grad_kwargs)
  # m-sharpness normalises each replica's own direction: one norm per replica.
  norm_spec = P() if perturbation == "global" else P(data_axis)
  step = jax.jit(
    jax.shard_map(
      step,
      mesh=mesh,
      in_specs=(specs, state_specs, batch_spec, batch_spec),
      out_specs=(specs, state_specs, P(), norm_spec),
    )
  )
  params = place_tree(mesh, params, specs)
  opt_state = place_tree(mesh, tx.init(params), state_specs)
  run = train(step, params, opt_state, lambda b: place_tree(mesh, b, batch_spec))
  if model_parallel:
    assert run.params["w0"].sharding.spec == MODEL_SPECS["w0"]
    assert run.opt_state[0].ema["w0"].sharding.spec == MODEL_SPECS["w0"]
  return run


@functools.cache
def per_replica_by_hand(replicas: int) -> Run:
  """m-sharpness in NumPy: each replica perturbs along its own d; g' is their mean."""
  opt, sgd = ref.FSAMReference(**FSAM), ref.SGDReference(LR, MOMENTUM, weight_decay=0.0)
  theta, losses, norms = ref.init_mlp(0, SIZES), [], []
  for x, y in data():
    shards = list(zip(np.split(x, replicas), np.split(y, replicas), strict=True))
    clean = [ref.mlp_loss_and_grad(theta, xs, ys) for xs, ys in shards]
    g_perturbed = []
    for (xs, ys), (_, g) in zip(shards, clean, strict=True):
      d = g if opt.m is None else {k: g[k] - opt.sigma * opt.m[k] for k in g}
      e = opt.perturbation(theta, d)
      g_perturbed.append(ref.mlp_loss_and_grad({k: theta[k] + e[k] for k in theta}, xs, ys)[1])
      norms.append(np.sqrt(sum(np.sum(v**2) for v in d.values())))
      norms.append(np.sqrt(sum(np.sum(v**2) for v in e.values())))
    opt.direction({k: np.mean([g[k] for _, g in clean], axis=0) for k in theta})
    theta = sgd.step(theta, {k: np.mean([g[k] for g in g_perturbed], axis=0) for k in theta})
    losses.append(np.mean([value for value, _ in clean]))
  state = (opt.m, (sgd.trace,))
  return Run(theta, state, np.array(losses), np.reshape(norms, (-1, 2 * replicas)))


def test_model_parallel_mesh_equals_one_device():
  with jax.enable_x64(True):
    assert_same_run(run_shard_map((4,), ("model",)), single_device())


def test_model_parallel_mesh_adaptive_norm_equals_one_device():
  with jax.enable_x64(True):
    assert_same_run(run_shard_map((4,), ("model",), adaptive=True), single_device(adaptive=True))


@pytest.mark.parametrize("axis_type", [AUTO, EXPLICIT], ids=["auto", "explicit"])
def test_data_by_model_mesh_global_equals_one_device_on_global_batch(axis_type):
  with jax.enable_x64(True):
    assert_same_run(run_shard_map((2, 4), ("data", "model"), axis_type), single_device())


@pytest.mark.parametrize("adaptive", [False, True], ids=["fsam", "adaptive"])
def test_every_second_step_on_the_data_by_model_mesh_equals_one_device(monkeypatch, adaptive):
  # The schedule's lax.cond around the sharded norm: both branches keep the same
  # sharding types, and skipped steps hand on the averaged clean gradient.
  monkeypatch.setitem(FSAM, "every", 2)
  with jax.enable_x64(True):
    got = run_shard_map.__wrapped__((2, 4), ("data", "model"), adaptive=adaptive)
    want = single_device.__wrapped__(adaptive)
    assert_same_run(got, want)
    assert np.all(want.norms[1::2] == 0) and np.all(want.norms[::2] > 0)


def test_data_by_model_mesh_per_device_equals_a_loop_over_replicas():
  with jax.enable_x64(True):
    got = run_shard_map((2, 4), ("data", "model"), perturbation="per_device")
    want = per_replica_by_hand(replicas=2)
    assert_close(
      (got.params, got.opt_state[0].ema, got.opt_state[1][0].trace, got.losses, got.norms),
      (want.params, *want.opt_state, want.losses, want.norms),
    )
    # m-sharpness is another algorithm, not a rounding of the global one.
    assert np.max(np.abs(got.params["w0"] - single_device().params["w0"])) > 1e-4


@pytest.mark.parametrize("axis_type", [AUTO, EXPLICIT], ids=["auto", "explicit"])
def test_shard_map_data_parallel_with_replicated_params_equals_one_device(axis_type):
  with jax.enable_x64(True):
    assert_same_run(run_shard_map((8,), ("data",), axis_type), single_device())


def test_pmap_equals_one_device():
  n = jax.device_count()
  tx = make_tx()
  step = jax.pmap(make_step(mlp_loss, tx, axis_name="data"), "data")
  replicate = lambda tree: jax.tree.map(lambda a: jnp.broadcast_to(a, (n, *a.shape)), tree)
  split = lambda batch: tuple(a.reshape(n, -1, a.shape[-1]) for a in batch)
  with jax.enable_x64(True):
    params = init()
    run = train(step, replicate(params), replicate(tx.init(params)), split)
    want = single_device()
  # Every device holds the same result (devices on axis 0 of the state, 1 of the losses).
  for leaf in jax.tree.leaves(run[:2]):
    np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[:1], leaf.shape))
  for leaf in run[2:]:
    np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[:, :1], leaf.shape))
  first = Run(*jax.tree.map(lambda a: a[0], run[:2]), run.losses[:, 0], run.norms[:, 0])
  assert_same_run(first, want)


@pytest.mark.parametrize("axis_type", [AUTO, EXPLICIT], ids=["auto", "explicit"])
def test_jit_fsdp_equals_one_device(axis_type):
  mesh = mesh_of((8,), ("data",), axis_type)
  tx = make_tx()
  with jax.enable_x64(True), jax.set_mesh(mesh):
    params = init()
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), FSDP_SPECS, is_leaf=_is_spec)
    state_shardings = fsam_optax.opt_state_shardings(tx, params, shardings)
    replicated = NamedSharding(mesh, P())
    step = jax.jit(
      make_step(fsdp_loss, tx),
      out_shardings=(shardings, state_shardings, replicated, replicated),
    )
    params = jax.device_put(params, shardings)
    opt_state = jax.device_put(tx.init(params), state_shardings)
    run = train(
      step, params, opt_state, lambda b: jax.device_put(b, NamedSharding(mesh, P("data")))
    )
    assert_same_run(run, single_device())
  assert run.params["w0"].sharding.spec == P(None, "data")
  assert run.opt_state[0].ema["w0"].sharding.spec == P(None, "data")
  assert run.opt_state[1][0].trace["b0"].sharding.spec == P("data")


def gathering_loss(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
  # FSDP by hand inside shard_map: gather each leaf split over "data" before use.
  def gather(w, spec):
    return jax.lax.all_gather(w, "data", axis=tuple(spec).index("data"), tiled=True) if spec else w

  return mlp_loss(jax.tree.map(gather, params, FSDP_SPECS), x, y)


def test_fsdp_inside_shard_map_equals_one_device():
  mesh = mesh_of((8,), ("data",), EXPLICIT)
  tx = make_tx()
  with jax.enable_x64(True):
    params = init()
    state_specs = fsam_optax.opt_state_shardings(tx, params, FSDP_SPECS)
    step = make_step(gathering_loss, tx, axis_name="data", param_specs=FSDP_SPECS)
    step = jax.jit(
      jax.shard_map(
        step,
        mesh=mesh,
        in_specs=(FSDP_SPECS, state_specs, P("data"), P("data")),
        out_specs=(FSDP_SPECS, state_specs, P(), P()),
      )
    )
    run = train(
      step,
      place_tree(mesh, params, FSDP_SPECS),
      place_tree(mesh, tx.init(params), state_specs),
      lambda b: place_tree(mesh, b, P("data")),
    )
    assert_same_run(run, single_device())
  assert run.opt_state[0].ema["b0"].sharding.spec == P("data")


def test_orbax_restores_the_model_split_state_straight_onto_the_mesh():
  mesh = mesh_of((4,), ("model",), EXPLICIT)
  tx = make_tx()
  with jax.enable_x64(True):
    run = run_shard_map((4,), ("model",))
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), MODEL_SPECS, is_leaf=_is_spec)
    target = jax.tree.map(
      lambda shape, sharding: jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding),
      jax.eval_shape(tx.init, init()),
      fsam_optax.opt_state_shardings(tx, init(), shardings),
    )
    with tempfile.TemporaryDirectory() as tmp, ocp.StandardCheckpointer() as ckpt:
      ckpt.save(f"{tmp}/state", run.opt_state)
      ckpt.wait_until_finished()
      restored = ckpt.restore(f"{tmp}/state", target)
  assert_close(restored, run.opt_state)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(target), strict=True):
    assert got.sharding.is_equivalent_to(want.sharding, got.ndim)
  assert restored[0].ema["w0"].sharding.spec == P(None, "model")
  assert restored[0].ema["w0"].addressable_shards[0].data.shape == (5, 2)


# ---- batch statistics from the clean pass ----


def loss_with_stats(params, x, y):
  # Like batch norm's statistics: the batch mean of the hidden activations.
  h = jnp.tanh(x @ params["w0"] + params["b0"][None, :])
  return jnp.mean((h @ params["w1"] + params["b1"][None, :] - y) ** 2), jnp.mean(h, axis=0)


def stats_of(average_aux: bool, mapped: str) -> tuple[np.ndarray, np.ndarray]:
  """The aux of one step's clean pass on 8 devices, and of one device on the whole batch."""
  tx = make_tx()
  params = init()
  opt_state = tx.init(params)
  x, y = data()[0]
  kwargs = dict(has_aux=True, axis_name="data", average_aux=average_aux)
  grad_fn = fsam_optax.sam_value_and_grad(loss_with_stats, **kwargs)
  aux_of = lambda p, s, x, y: grad_fn(p, s, x, y)[0][1]
  if mapped == "pmap":
    n = jax.device_count()
    got = jax.pmap(aux_of, "data", in_axes=(None, None, 0, 0))(
      params, opt_state, x.reshape(n, -1, SIZES[0]), y.reshape(n, -1, SIZES[-1])
    )
  else:
    mesh = mesh_of((8,), ("data",), EXPLICIT)
    # Averaged, the stats are the same everywhere; otherwise one row per device.
    out = P() if average_aux else P("data")
    mapped_fn = jax.shard_map(
      lambda *a: aux_of(*a)[None] if not average_aux else aux_of(*a),
      mesh=mesh,
      in_specs=(P(), P(), P("data"), P("data")),
      out_specs=out,
    )
    got = jax.jit(mapped_fn)(params, opt_state, *place_tree(mesh, (x, y), P("data")))
  whole = loss_with_stats(params, x, y)[1]
  per_device = np.stack(
    [
      loss_with_stats(params, xs, ys)[1]
      for xs, ys in zip(np.split(x, 8), np.split(y, 8), strict=True)
    ]
  )
  return np.asarray(got), np.asarray(whole), per_device


@pytest.mark.parametrize("mapped", ["pmap", "shard_map"])
def test_average_aux_gives_the_batch_statistics_of_the_global_batch(mapped):
  with jax.enable_x64(True):
    got, whole, _ = stats_of(average_aux=True, mapped=mapped)
  got = got.reshape(-1, SIZES[1])
  np.testing.assert_allclose(got, np.broadcast_to(whole, got.shape), rtol=0, atol=1e-12)


@pytest.mark.parametrize("mapped", ["pmap", "shard_map"])
def test_aux_is_per_device_without_average_aux(mapped):
  with jax.enable_x64(True):
    got, whole, per_device = stats_of(average_aux=False, mapped=mapped)
  np.testing.assert_allclose(got, per_device, rtol=0, atol=1e-12)
  assert np.max(np.abs(got - whole)) > 1e-3


# ---- JAX's types, which the layout checks read ----


def test_varying_axes_reads_jax_types():
  # Fails if JAX renames what `jax.typeof` exposes, instead of every check
  # silently passing.
  mesh = mesh_of((2, 4), ("data", "model"), EXPLICIT)
  seen = {}

  def body(split, replicated):
    seen["split"], seen["replicated"] = varying_axes(split), varying_axes(replicated)
    seen["manual"] = manual_axes()
    return replicated

  x = place_tree(mesh, jnp.zeros((8, 4)), P(None, "model"))
  jax.shard_map(body, mesh=mesh, in_specs=(P(None, "model"), P()), out_specs=P())(x, jnp.zeros(3))
  assert seen == {
    "split": frozenset({"model"}),
    "replicated": frozenset(),
    "manual": frozenset({"data", "model"}),
  }
  assert varying_axes(jnp.zeros(3)) == frozenset()
  assert manual_axes() == frozenset()
  pmap_manual = jax.pmap(lambda x: (seen.update(pmap=manual_axes()), x)[1], "i")
  pmap_manual(jnp.zeros((2, 1)))
  assert seen["pmap"] == frozenset({"i"})
