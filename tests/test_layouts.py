"""F-SAM on every parallel layout equals its reference, step for step.

Each layout trains the same MLP for 5 float64 steps on 8 simulated CPU devices (or two
processes of 2): ``pmap``, ``shard_map`` over a data axis, a model axis or both, a
batch-sharded ``jit``, FSDP under ``jit`` or inside ``shard_map``, with micro-batches or
a schedule. Its params after every step, optimizer state, losses and norms must match,
within 1e-12, one device running the whole batch (or, for m-sharpness, a NumPy loop over
the data replicas). The model-parallel layouts split the MLP Megatron-style: the hidden
units over ``"model"``, with a ``psum`` after the second matmul.
"""

from __future__ import annotations

import functools
import inspect
import tempfile
from collections.abc import Iterator
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
from tests.jax_mlp import fsdp_loss, megatron_loss, mlp_loss
from tests.train_step import documented_draw, sam_step
from tests.two_processes import run_two_processes

STEPS = 5
TOL = 1e-12  # float64; only the order of the cross-device sums differs
SIZES = (5, 8, 3)
BATCH = 16  # two examples per device
FSAM = dict(rho=0.2, sigma=1.0, lmbda=0.6)
LR, MOMENTUM = 0.1, 0.9
OUTPUTS = ("loss", "norms")
AUTO, EXPLICIT = AxisType.Auto, AxisType.Explicit
MESHES = {"data": ((8,), ("data",)), "model": ((4,), ("model",))}
MESHES["data_by_model"] = ((2, 4), ("data", "model"))
# Megatron-style: hidden units split over "model"; the output bias replicated.
MODEL_SPECS = {"w0": P(None, "model"), "b0": P("model"), "w1": P("model", None), "b1": P()}
# FSDP: every large leaf split over the data axis; jit gathers it for the matmuls.
FSDP_SPECS = {"w0": P(None, "data"), "b0": P("data"), "w1": P("data", None), "b1": P()}


@pytest.fixture(autouse=True)
def x64() -> Iterator[None]:
  with jax.enable_x64(True):
    yield


def make_tx(sam=False, adaptive=False, **schedule) -> optax.GradientTransformation:
  if sam:
    first = fsam_optax.sam(FSAM["rho"], adaptive=adaptive, **schedule)
  else:
    first = fsam_optax.fsam(**FSAM, adaptive=adaptive, **schedule)
  return optax.chain(first, optax.sgd(LR, momentum=MOMENTUM))


def init() -> dict:
  return jax.tree.map(jnp.asarray, ref.init_mlp(0, SIZES))


def data() -> list:
  return ref.batches(seed=21, steps=STEPS, batch=BATCH, sizes=SIZES)


class Run(NamedTuple):
  path: list  # the params after every step
  opt_state: Any
  losses: np.ndarray
  norms: np.ndarray  # the direction's and the perturbation's, per step (and replica)

  @property
  def params(self) -> Any:
    return self.path[-1]


def train(step, params, opt_state, place=lambda batch: batch) -> Run:
  path, losses, norms = [], [], []
  for batch in data():
    params, opt_state, loss, norm = step(params, opt_state, *place(batch))
    path.append(params)
    losses.append(np.asarray(loss))
    norms.append(np.asarray(norm))
  return Run(path, opt_state, np.array(losses), np.array(norms))


def assert_close(got: Any, want: Any) -> None:
  got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
  assert len(got_leaves) == len(want_leaves)
  for g, w in zip(got_leaves, want_leaves, strict=True):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=TOL)


def assert_same_run(got: Run, want: Run) -> None:
  assert_close(tuple(got), tuple(want))


def mesh_of(shape: tuple, names: tuple, axis_type: AxisType) -> jax.sharding.Mesh:
  return jax.make_mesh(shape, names, axis_types=(axis_type,) * len(names))


def place_tree(mesh, tree, specs):
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=_is_spec)
  return jax.device_put(tree, jax.tree.broadcast(shardings, tree))


def _is_spec(x: Any) -> bool:
  return isinstance(x, P)


def replicate(tree):  # for pmap over the 8 devices
  return jax.tree.map(lambda a: jnp.broadcast_to(a, (8, *a.shape)), tree)


def split_batch(batch):
  return tuple(a.reshape(8, -1, a.shape[-1]) for a in batch)


def cached(run):
  """``functools.cache`` with the defaults bound, so that ``f()`` and ``f(sam=False)`` share."""
  signature, cache = inspect.signature(run), functools.cache(run)

  @functools.wraps(run)
  def wrapper(*args, **kwargs):
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    return cache(*bound.args, **bound.kwargs)

  return wrapper


@cached
def one_device(micro_batches: int | None = None, sam=False, adaptive=False, **schedule) -> Run:
  tx = make_tx(sam, adaptive, **schedule)
  step = sam_step(tx, mlp_loss, outputs=OUTPUTS, micro_batches=micro_batches)
  return train(step, init(), tx.init(init()))


@cached
def run_pmap(perturbation: str = "global", sam: bool = False, **schedule) -> Run:
  """pmap over the 8 devices; every device must hold the same run, which this returns."""
  tx = make_tx(sam, **schedule)
  pmap = functools.partial(jax.pmap, axis_name="data")
  step = sam_step(tx, mlp_loss, outputs=OUTPUTS, mapped=pmap, jit=False, axis_name="data",
                  perturbation=perturbation)  # fmt: skip
  run = train(step, replicate(init()), replicate(tx.init(init())), split_batch)
  # Devices on axis 0 of the params and state, 1 of the losses and norms.
  for leaf in jax.tree.leaves((run.path, run.opt_state)):
    np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[:1], leaf.shape))
  for leaf in [run.losses] + [run.norms] * (perturbation == "global"):
    np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[:, :1], leaf.shape))
  # m-sharpness: one norm per replica.
  norms = run.norms[:, 0] if perturbation == "global" else run.norms.reshape(STEPS, -1)
  first = lambda tree: jax.tree.map(lambda a: a[0], tree)
  return Run(first(run.path), first(run.opt_state), run.losses[:, 0], norms)


@cached
def run_shard_map(
  layout: str,
  axis_type: AxisType = EXPLICIT,
  perturbation: str = "global",
  micro_batches: int | None = None,
  sam: bool = False,
  adaptive: bool = False,
  **schedule,
) -> Run:
  """shard_map over a mesh with a "model" axis (params split) and/or a "data" axis (batch split)."""
  mesh = mesh_of(*MESHES[layout], axis_type)
  names = mesh.axis_names
  model_parallel = "model" in names
  tx = make_tx(sam, adaptive, **schedule)
  params = init()
  specs = MODEL_SPECS if model_parallel else P()
  state_specs = fsam_optax.opt_state_shardings(tx, params, specs)
  data_axis = "data" if "data" in names else None
  batch = P(data_axis)
  # m-sharpness normalises each replica's own direction: one norm per replica.
  norm_spec = P() if perturbation == "global" else P(data_axis)
  shard_map = functools.partial(
    jax.shard_map,
    mesh=mesh,
    in_specs=(specs, state_specs, batch, batch),
    out_specs=(specs, state_specs, P(), norm_spec),
  )
  grad_kwargs = dict(axis_name=data_axis, perturbation=perturbation, micro_batches=micro_batches)
  if model_parallel:
    grad_kwargs["param_specs"] = MODEL_SPECS
  loss = megatron_loss if model_parallel else mlp_loss
  step = sam_step(tx, loss, outputs=OUTPUTS, mapped=shard_map, **grad_kwargs)
  params = place_tree(mesh, params, specs)
  opt_state = place_tree(mesh, tx.init(params), state_specs)
  run = train(step, params, opt_state, lambda b: place_tree(mesh, b, batch))
  if model_parallel:
    assert run.params["w0"].sharding.spec == MODEL_SPECS["w0"]
    assert run.opt_state[0].ema["w0"].sharding.spec == MODEL_SPECS["w0"]
  return run


def run(layout: str, **options) -> Run:
  if layout == "one_device":
    return one_device(**options)
  return run_pmap(**options) if layout == "pmap" else run_shard_map(layout, **options)


@cached
def per_replica_by_hand(replicas: int, sam: bool = False) -> Run:
  """m-sharpness in NumPy: each replica perturbs along its own d; g' is their mean."""
  opt = ref.FSAMReference(**{**FSAM, "sigma": 0.0} if sam else FSAM)
  sgd = ref.SGDReference(LR, MOMENTUM, weight_decay=0.0)
  theta, path, losses, norms = ref.init_mlp(0, SIZES), [], [], []
  for x, y in data():
    shards = list(zip(np.split(x, replicas), np.split(y, replicas), strict=True))
    clean = [ref.mlp_loss_and_grad(theta, xs, ys) for xs, ys in shards]
    g_perturbed = []
    for (xs, ys), (_, g) in zip(shards, clean, strict=True):
      d = g if opt.m is None else {k: g[k] - opt.sigma * opt.m[k] for k in g}
      e = opt.perturbation(theta, d)
      g_perturbed.append(ref.mlp_loss_and_grad({k: theta[k] + e[k] for k in theta}, xs, ys)[1])
      norms += [np.sqrt(sum(np.sum(v**2) for v in t.values())) for t in (d, e)]
    # The EMA sees the mean g.
    opt.direction({k: np.mean([g[k] for _, g in clean], axis=0) for k in theta})
    theta = sgd.step(theta, {k: np.mean([g[k] for g in g_perturbed], axis=0) for k in theta})
    path.append(theta)
    losses.append(np.mean([value for value, _ in clean]))
  state = (None if sam else opt.m, sgd.trace)
  return Run(path, state, np.array(losses), np.reshape(norms, (STEPS, 2 * replicas)))


def test_eight_devices_are_simulated():
  assert jax.device_count() == 8


# layout: options of the layout (axis types, micro-batches) and of the optimizer.
GLOBAL = {
  "pmap": ("pmap", {}),
  "data-auto": ("data", dict(axis_type=AUTO)),
  "data-explicit": ("data", {}),
  "data-micro_batches": ("data", dict(micro_batches=2)),
  "model": ("model", {}),
  "model-adaptive": ("model", dict(adaptive=True)),
  "data_by_model-auto": ("data_by_model", dict(axis_type=AUTO)),
  "data_by_model-explicit": ("data_by_model", {}),
  "data_by_model-micro_batches": ("data_by_model", dict(micro_batches=2)),
  # The schedule's lax.cond around the sharded norm: both branches keep the same
  # sharding types, and skipped steps hand on the averaged clean gradient.
  "data_by_model-every2": ("data_by_model", dict(every=2)),
  "data_by_model-every2-adaptive": ("data_by_model", dict(every=2, adaptive=True)),
  # One perturbation from the whole batch's gradient, each pass a scan over 4 micro-batches.
  "one_device-micro_batches": ("one_device", dict(micro_batches=4)),
}


@pytest.mark.parametrize("case", GLOBAL)
def test_global_perturbation_equals_one_device_on_the_global_batch(case):
  layout, options = GLOBAL[case]
  tx_options = {k: v for k, v in options.items() if k in ("adaptive", "every")}
  want = one_device(**tx_options)
  assert_same_run(run(layout, **options), want)
  if "every" in options:
    assert np.all(want.norms[1::2] == 0) and np.all(want.norms[::2] > 0)


REPLICAS = {"pmap": 8, "data": 8, "data_by_model": 2}


@pytest.mark.parametrize(
  ("layout", "sam"),
  [("pmap", False), ("pmap", True), ("data", False), ("data", True), ("data_by_model", False)],
)
def test_per_device_perturbation_equals_a_loop_over_replicas(layout, sam):
  got = run(layout, perturbation="per_device", sam=sam)
  state = (got.opt_state[0].ema, got.opt_state[1][0].trace)
  assert_same_run(got._replace(opt_state=state), per_replica_by_hand(REPLICAS[layout], sam))
  # m-sharpness is another algorithm, not a rounding of the global one.
  assert np.max(np.abs(got.params["w0"] - one_device(sam=sam).params["w0"])) > 1e-4


@pytest.mark.parametrize("layout", ["pmap", "data"])
def test_the_random_choice_of_the_sam_steps_is_the_same_on_every_device(layout):
  # Per-device perturbation: each device's norm is its own, not an average.
  norms = run(layout, perturbation="per_device", probability=0.5, seed=21).norms[:, 1::2]
  assert norms.shape == (STEPS, 8)
  taken = np.isclose(norms, FSAM["rho"], rtol=1e-5)
  assert np.all(taken.all(axis=1) | (norms == 0).all(axis=1)), norms
  assert list(taken.all(axis=1)) == documented_draw(0.5, 21, STEPS)


def test_batch_sharded_jit_equals_one_device_and_compiles_once():
  mesh = mesh_of((8,), ("data",), EXPLICIT)
  traces, tx = 0, make_tx()
  inner = sam_step(tx, mlp_loss, outputs=OUTPUTS, jit=False)

  def counted(*args):
    nonlocal traces
    traces += 1
    return inner(*args)

  step = jax.jit(counted)
  # Replicated, spelt as jit spells its outputs' sharding (P(None, None) for
  # a matrix, not P()), so that step 2's inputs match step 1's exactly.
  replicated = lambda a: jax.device_put(a, NamedSharding(mesh, P(*(None,) * a.ndim)))
  params, opt_state = jax.tree.map(replicated, (init(), tx.init(init())))
  place = lambda batch: place_tree(mesh, batch, P("data"))
  run = train(step, params, opt_state, place)
  assert_same_run(run, one_device())
  assert place(data()[0])[0].sharding.num_devices == 8
  # One trace and one compiled executable: steps 2 and later reuse step 1's.
  assert traces == 1
  assert step._cache_size() == 1


@pytest.mark.parametrize("axis_type", [AUTO, EXPLICIT], ids=["auto", "explicit"])
def test_jit_fsdp_equals_one_device(axis_type):
  mesh = mesh_of((8,), ("data",), axis_type)
  tx = make_tx()
  with jax.set_mesh(mesh):
    params = init()
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), FSDP_SPECS, is_leaf=_is_spec)
    state_shardings = fsam_optax.opt_state_shardings(tx, params, shardings)
    replicated = NamedSharding(mesh, P())
    step = jax.jit(
      sam_step(tx, fsdp_loss, outputs=OUTPUTS, jit=False),
      out_shardings=(shardings, state_shardings, replicated, replicated),
    )
    params = jax.device_put(params, shardings)
    opt_state = jax.device_put(tx.init(params), state_shardings)
    run = train(step, params, opt_state, lambda b: place_tree(mesh, b, P("data")))
    assert_same_run(run, one_device())
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
  params = init()
  state_specs = fsam_optax.opt_state_shardings(tx, params, FSDP_SPECS)
  shard_map = functools.partial(
    jax.shard_map,
    mesh=mesh,
    in_specs=(FSDP_SPECS, state_specs, P("data"), P("data")),
    out_specs=(FSDP_SPECS, state_specs, P(), P()),
  )
  step = sam_step(tx, gathering_loss, outputs=OUTPUTS, mapped=shard_map, axis_name="data",
                  param_specs=FSDP_SPECS)  # fmt: skip
  run = train(
    step,
    place_tree(mesh, params, FSDP_SPECS),
    place_tree(mesh, tx.init(params), state_specs),
    lambda b: place_tree(mesh, b, P("data")),
  )
  assert_same_run(run, one_device())
  assert run.opt_state[0].ema["b0"].sharding.spec == P("data")


def test_orbax_restores_the_model_split_state_straight_onto_the_mesh():
  mesh = mesh_of((4,), ("model",), EXPLICIT)
  tx = make_tx()
  run = run_shard_map("model")
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


@pytest.mark.parametrize(
  "mask",
  [{"w0": True, "b0": False, "w1": True, "b1": False}, lambda p: {k: k[0] == "w" for k in p}],
  ids=["tree", "callable"],
)
def test_opt_state_shardings_of_a_masked_state(mask):
  # The mask resolves against the params at init; the specs follow the params all the same,
  # with the structure (the mask included) of the real state.
  tx = optax.chain(fsam_optax.fsam(mask=mask), optax.adamw(0.1))
  specs = fsam_optax.opt_state_shardings(tx, init(), MODEL_SPECS)
  assert jax.tree.structure(specs, is_leaf=_is_spec) == jax.tree.structure(tx.init(init()))
  assert specs[0].ema == specs[1][0].mu == specs[1][0].nu == MODEL_SPECS
  assert specs[0].count == specs[1][0].count == P()


# ---- two processes, 2 CPU devices each (run by tests/multi_process_worker.py) ----

TIMEOUT_S = 120


def test_two_processes_train_like_one():
  # Each process feeds its half of every batch; data-parallel F-SAM under jit and
  # under shard_map must give, in both processes, the params, optimizer state and
  # losses of one process running the whole batch, within 1e-9.
  results = run_two_processes("tests.multi_process_worker", TIMEOUT_S)
  want = one_device()
  want_leaves = jax.tree.leaves((want.params, want.opt_state, list(want.losses)))
  for result in results:
    assert len(result) == 2 * len(want_leaves)
    for layout in ("jit", "shard_map"):
      for i, w in enumerate(want_leaves):
        np.testing.assert_allclose(result[f"{layout}_{i}"], np.asarray(w), rtol=0, atol=1e-9)


# ---- batch statistics from the clean pass ----


def loss_with_stats(params, x, y):
  # Like batch norm's statistics: the batch mean of the hidden activations.
  h = jnp.tanh(x @ params["w0"] + params["b0"][None, :])
  return jnp.mean((h @ params["w1"] + params["b1"][None, :] - y) ** 2), jnp.mean(h, axis=0)


def stats_of(average_aux: bool, mapped: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The aux of one step's clean pass: on 8 devices (a row each), on one device for the
  whole batch, and for each device's shard."""
  tx, params, (x, y) = make_tx(), init(), data()[0]
  kwargs = dict(outputs=("loss",), has_aux=True, axis_name="data", average_aux=average_aux)
  if mapped == "pmap":
    pmap = functools.partial(jax.pmap, axis_name="data")
    step = sam_step(tx, loss_with_stats, mapped=pmap, jit=False, **kwargs)
    *_, (_, got) = step(replicate(params), replicate(tx.init(params)), *split_batch((x, y)))
  else:
    mesh = mesh_of((8,), ("data",), EXPLICIT)
    # Averaged, the stats are the same everywhere; otherwise a row per device.
    aux = P() if average_aux else P("data")
    shard_map = functools.partial(
      jax.shard_map,
      mesh=mesh,
      in_specs=(P(), P(), P("data"), P("data")),
      out_specs=(P(), P(), (P(), aux)),
    )
    step = sam_step(tx, loss_with_stats, mapped=shard_map, **kwargs)
    *_, (_, got) = step(params, tx.init(params), *place_tree(mesh, (x, y), P("data")))
  shards = zip(np.split(x, 8), np.split(y, 8), strict=True)
  per_device = np.stack([loss_with_stats(params, xs, ys)[1] for xs, ys in shards])
  whole = np.asarray(loss_with_stats(params, x, y)[1])
  return np.asarray(got).reshape(-1, SIZES[1]), whole, per_device


@pytest.mark.parametrize("mapped", ["pmap", "shard_map"])
def test_average_aux_gives_the_batch_statistics_of_the_global_batch(mapped):
  got, whole, _ = stats_of(average_aux=True, mapped=mapped)
  np.testing.assert_allclose(got, np.broadcast_to(whole, got.shape), rtol=0, atol=1e-12)


@pytest.mark.parametrize("mapped", ["pmap", "shard_map"])
def test_aux_is_per_device_without_average_aux(mapped):
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


def test_opt_state_shardings_with_a_leaf_that_is_not_differentiated():
  # The methods' buffers skip an integer leaf (None there); they are still sharded like the
  # params, and the base optimizer's, which keep the leaf, too.
  params = {**init(), "steps": jnp.zeros((), jnp.int32)}
  tx = optax.chain(fsam_optax.fsam(), optax.sgd(0.1, momentum=0.9))
  specs = fsam_optax.opt_state_shardings(tx, params, {**MODEL_SPECS, "steps": P()})
  assert specs[0].ema == {**MODEL_SPECS, "steps": None}
  assert specs[1][0].trace == {**MODEL_SPECS, "steps": P()}
