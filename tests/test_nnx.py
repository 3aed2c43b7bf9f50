"""NNX in its own idiom: ``grad_fn(model, optimizer, *args)`` inside ``nnx.jit``.

A model with BatchNorm and Dropout is trained for 32 steps and compared, in float64,
with the same network written by hand as a function of a dict of arrays, driven by
the NumPy statements of the methods in ``tests/reference.py``: the parameters, the
running statistics (those of the clean pass) and the dropout stream's count (each
pass draws its own mask with ``second_pass_rng="fresh"``, both passes the same one
with ``"same"``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, traverse_util
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import fsam_optax
from tests import reference as ref
from tests.jax_mlp import METHOD_PAIRS as METHODS
from tests.jax_mlp import max_abs_diff
from tests.test_flax import NNXNet as BNNet  # Linear, BatchNorm, Linear: no RNG streams

STEPS = 32
LR, MOMENTUM = 0.05, 0.9
RATE, BN_MOMENTUM, BN_EPS = 0.3, 0.99, 1e-5  # the Dropout's rate, nnx.BatchNorm's defaults
TOL = 1e-12


class DropNet(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.linear1 = nnx.Linear(5, 6, param_dtype=jnp.float64, rngs=rngs)
    self.bn = nnx.BatchNorm(6, param_dtype=jnp.float64, rngs=rngs)
    self.dropout = nnx.Dropout(RATE, rngs=rngs)
    self.linear2 = nnx.Linear(6, 3, param_dtype=jnp.float64, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.linear2(self.dropout(jnp.tanh(self.bn(self.linear1(x)))))


def loss_fn(model: DropNet, x: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.mean((model(x) - y) ** 2)


def float64_stats(model):
  # nnx.BatchNorm makes float32 statistics; keep them in float64 throughout.
  for stat in (model.bn.mean, model.bn.var):
    stat.set_value(stat.get_value().astype(jnp.float64))
  return model


def new_model() -> DropNet:
  return float64_stats(DropNet(nnx.Rngs(0, dropout=1)))


def params_of(model: DropNet) -> dict:
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)), sep="/")
  return {k: np.asarray(v) for k, v in flat.items()}


def stats_of(model: DropNet) -> tuple[np.ndarray, np.ndarray]:
  return np.asarray(model.bn.mean.get_value()), np.asarray(model.bn.var.get_value())


def count_of(model: DropNet) -> int:
  return int(model.dropout.rngs.count.get_value())


# ---- The reference: the same network on a dict of arrays, its dropout stream by hand ----


def pre_norm(p: dict, x):
  return x @ p["linear1/kernel"] + p["linear1/bias"][None]


@jax.jit
def pure_loss_and_grad(p: dict, x, y, key):
  def loss(p):
    h = pre_norm(p, x)
    h = (h - h.mean(0, keepdims=True)) / jnp.sqrt(h.var(0, keepdims=True) + BN_EPS)
    h = h * p["bn/scale"][None] + p["bn/bias"][None]
    h = jnp.tanh(h)
    keep = jax.random.bernoulli(key, 1 - RATE, h.shape)
    h = jnp.where(keep, h / (1 - RATE), 0.0)
    return jnp.mean((h @ p["linear2/kernel"] + p["linear2/bias"][None] - y) ** 2)

  return jax.value_and_grad(loss)(p)


@dataclasses.dataclass
class Reference:
  """The model's maths by hand: its dropout stream (key, count) and running statistics."""

  key: jax.Array
  mode: str  # second_pass_rng
  micro_batches: int = 1
  count: int = 0
  stats: tuple | None = None

  def run(self, method, theta: dict, data: list) -> list[tuple[dict, tuple, int]]:
    """(params, statistics, count) after each step of ``method`` then momentum SGD."""
    base = ref.SGDReference(LR, MOMENTUM, weight_decay=0.0)
    path = []
    for x, y in data:
      start, passes = self.count, []

      def grad_at(w, x=x, y=y, start=start, passes=passes):
        # Each pass draws one key per micro-batch, going on from the last pass
        # ("fresh") or from where the step began ("same").
        first = start + (len(passes) * self.micro_batches if self.mode == "fresh" else 0)
        grads = []
        for i, (xb, yb) in enumerate(self.chunks(x, y)):
          key = jax.random.fold_in(self.key, first + i)
          grads.append(pure_loss_and_grad(w, xb, yb, key)[1])
        passes.append(w)
        self.count = max(self.count, first + self.micro_batches)
        return {k: np.mean([np.asarray(g[k]) for g in grads], axis=0) for k in w}

      new_theta = base.step(theta, method.gradient(theta, grad_at))
      for xb, _ in self.chunks(x, y):  # the clean pass's statistics, micro-batch by micro-batch
        h = np.asarray(pre_norm(theta, xb))
        self.stats = tuple(
          BN_MOMENTUM * old + (1 - BN_MOMENTUM) * new
          for old, new in zip(self.stats, (h.mean(0), h.var(0)), strict=True)
        )
      theta = new_theta
      path.append((theta, self.stats, self.count))
    return path

  def chunks(self, x, y):
    n = len(x) // self.micro_batches
    return [(x[i * n : (i + 1) * n], y[i * n : (i + 1) * n]) for i in range(self.micro_batches)]


def run_nnx(method, data, *, micro_batches=None, loss_scale=None, traces=None, **grad_kwargs):
  """The NNX idiom: (params, statistics, count) after each step, and the model.

  With ``traces`` (a list), the SAM-or-one-pass choice is made on the host and each
  trace of the step appends its choice there.
  """
  model = new_model()
  tx = optax.chain(method, optax.sgd(LR, momentum=MOMENTUM))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  grad_fn = fsam_optax.sam_value_and_grad(loss_fn, micro_batches=micro_batches, **grad_kwargs)

  @functools.partial(nnx.jit, static_argnames="sam_step")
  def train_step(model, optimizer, x, y, sam_step=None):
    if traces is not None:
      traces.append(sam_step)
    loss, grads = grad_fn(model, optimizer, x, y, loss_scale=loss_scale, sam_step=sam_step)
    optimizer.update(model, grads)
    return loss

  path = []
  for i, (x, y) in enumerate(data):
    sam_step = None if traces is None else fsam_optax.is_sam_step(optimizer, i)
    train_step(model, optimizer, x, y, sam_step=sam_step)
    path.append((params_of(model), stats_of(model), count_of(model)))
  return path, model


def compare(name, mode="fresh", micro_batches=1, **grad_kwargs):
  """The worst relative error of params and statistics over the steps; the counts."""
  method, reference = METHODS[name]
  with jax.enable_x64(True):
    data = ref.batches(seed=21, steps=STEPS, sizes=(5, 6, 3))
    got, _ = run_nnx(
      method(),
      data,
      second_pass_rng=mode,
      micro_batches=None if micro_batches == 1 else micro_batches,
      **grad_kwargs,
    )
    start = new_model()
    want = Reference(start.dropout.rngs.key.get_value(), mode, micro_batches, 0, stats_of(start))
    want_path = want.run(reference(), params_of(start), data)
  # Absolute errors: linear1's bias feeds BatchNorm, so its gradient is zero up to rounding.
  params_err = max(max_abs_diff(g[0], w[0]) for g, w in zip(got, want_path, strict=True))
  stats_err = max(
    float(np.max(np.abs(g_stat - w_stat)))
    for g, w in zip(got, want_path, strict=True)
    for g_stat, w_stat in zip(g[1], w[1], strict=True)
  )
  return params_err, stats_err, [g[2] for g in got], [w[2] for w in want_path]


@pytest.mark.parametrize("mode", ["fresh", "same"])
def test_fsam_with_batchnorm_and_dropout_equals_reference(mode):
  params_err, stats_err, counts, want_counts = compare("fsam", mode)
  assert params_err < TOL
  assert stats_err < 1e-12
  # "fresh": every pass draws a new key; "same": one per step, so no key goes to two steps.
  assert counts == want_counts == [(2 if mode == "fresh" else 1) * (t + 1) for t in range(STEPS)]


@pytest.mark.parametrize("name", ["sam", "gsam", "vasso", "looksam"])
def test_each_method_equals_reference(name):
  params_err, stats_err, counts, want_counts = compare(name)
  assert params_err < TOL
  assert stats_err < 1e-12
  assert counts == want_counts


def test_the_host_choice_under_nnx_jit_equals_the_device_schedule():
  """Params, statistics and the dropout count, with the optimizer read by is_sam_step."""
  with jax.enable_x64(True):
    data = ref.batches(seed=23, steps=8, sizes=(5, 6, 3))
    every_2 = lambda: fsam_optax.fsam(rho=0.2, sigma=1.0, lmbda=0.6, every=2)
    traces: list = []
    host, _ = run_nnx(every_2(), data, traces=traces)
    device, _ = run_nnx(every_2(), data)
  assert traces == [True, False]  # static: one trace for each choice
  for got, want in zip(host, device, strict=True):
    assert max_abs_diff(got[0], want[0]) < TOL
    for a, b in zip(got[1], want[1], strict=True):
      np.testing.assert_allclose(a, b, rtol=0, atol=TOL)
  assert [g[2] for g in host] == [w[2] for w in device] == [2, 3, 5, 6, 8, 9, 11, 12]


@pytest.mark.parametrize("mode", ["fresh", "same"])
def test_micro_batches_run_through_the_model_in_turn(mode):
  """Statistics and dropout keys go micro-batch by micro-batch, in the clean pass as in the
  perturbed one."""
  params_err, stats_err, counts, want_counts = compare("fsam", mode, micro_batches=2)
  assert params_err < TOL
  assert stats_err < 1e-12
  assert counts == want_counts == [(4 if mode == "fresh" else 2) * (t + 1) for t in range(STEPS)]


def test_loss_scale_is_taken_and_changes_nothing_in_float64():
  params_err, stats_err, counts, want_counts = compare("fsam", loss_scale=1024.0)
  assert params_err < TOL and stats_err < 1e-12 and counts == want_counts


# ---- The idiom against the split recipe, on a model without RNG streams ----


def noisy_loss(model, x, y, key):
  """A loss with its own key (input noise), and the mean output as aux."""
  out = model(x + 0.1 * jax.random.normal(key, x.shape))
  return jnp.mean((out - y) ** 2), jnp.mean(out)


def split_loss(params, graphdef, rest, x, y, key):
  model = nnx.merge(graphdef, params, rest, copy=True)
  (loss, aux), stats = noisy_loss(model, x, y, key), nnx.state(model, nnx.BatchStat)
  return loss, (aux, stats)


GRAD_KWARGS = dict(has_aux=True, return_diagnostics=True, rng_arg="key")


def idiom_step(grad_fn):
  @nnx.jit
  def step(model, optimizer, x, y, key):
    (loss, aux), grads, diag = grad_fn(model, optimizer, x, y, key)
    optimizer.update(model, grads)
    return loss, aux, diag

  return step


def split_step(grad_fn):
  @nnx.jit
  def step(model, optimizer, x, y, key):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    (loss, (aux, stats)), grads, diag = grad_fn(
      params, optimizer.opt_state, graphdef, rest, x, y, key
    )
    nnx.update(model, stats)
    optimizer.update(model, grads)
    return loss, aux, diag

  return step


def test_idiom_equals_split_recipe_with_aux_diagnostics_and_a_key_argument():
  """has_aux, return_diagnostics and rng_arg keep their meaning beside the model."""
  with jax.enable_x64(True):
    runs = []
    for make_step, fun in ((idiom_step, noisy_loss), (split_step, split_loss)):
      model = float64_stats(BNNet(nnx.Rngs(0)))
      tx = optax.chain(fsam_optax.fsam(rho=0.2, sigma=1.0, lmbda=0.6), optax.sgd(LR, MOMENTUM))
      optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
      step = make_step(fsam_optax.sam_value_and_grad(fun, **GRAD_KWARGS))
      outs = []
      for t, (x, y) in enumerate(ref.batches(seed=22, steps=4)):
        loss, aux, diag = step(model, optimizer, x, y, jax.random.key(t))
        outs.append((float(loss), float(aux), float(diag.sharpness), stats_of(model)))
      runs.append((outs, params_of(model)))
    (idiom, idiom_params), (split, split_params) = runs
    for a, b in zip(idiom, split, strict=True):
      assert a[:3] == b[:3]  # loss, aux, sharpness
      assert all(np.array_equal(u, v) for u, v in zip(a[3], b[3], strict=True))
    assert max_abs_diff(idiom_params, split_params) == 0.0


def optimized_hlo(step, *args) -> str:
  """The compiled program's text without metadata (source lines, op names) or its name."""
  text = step.lower(*args).compile().as_text()
  text = re.sub(r", metadata=\{[^}]*\}", "", text)
  text = text.split("\nFileNames\n")[0]  # the table of source files and functions
  return re.sub(r"^HloModule \S+", "HloModule", text)


def test_idiom_compiles_to_the_split_recipe():
  """Without RNG streams the idiom costs nothing: the same optimized HLO as the split recipe."""
  with jax.enable_x64(True):
    model = float64_stats(BNNet(nnx.Rngs(0)))
    tx = optax.chain(fsam_optax.fsam(rho=0.2, sigma=1.0, lmbda=0.6), optax.sgd(LR, MOMENTUM))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x, y, key = jnp.ones((16, 5)), jnp.ones((16, 3)), jax.random.key(0)
    idiom = idiom_step(fsam_optax.sam_value_and_grad(noisy_loss, **GRAD_KWARGS))
    split = split_step(fsam_optax.sam_value_and_grad(split_loss, **GRAD_KWARGS))
    assert optimized_hlo(idiom, model, optimizer, x, y, key) == optimized_hlo(
      split, model, optimizer, x, y, key
    )


def test_opt_state_in_place_of_the_optimizer_differentiates_params():
  """``optimizer.opt_state`` as second argument: ``nnx.Param`` is differentiated, as with
  the optimizer itself built with ``wrt=nnx.Param``."""
  with jax.enable_x64(True):
    results = []
    for second in (lambda o: o, lambda o: o.opt_state):
      model = new_model()
      tx = optax.chain(fsam_optax.fsam(rho=0.2), optax.sgd(LR))
      optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
      grad_fn = fsam_optax.sam_value_and_grad(loss_fn)

      @nnx.jit
      def step(model, optimizer, x, y, second=second, grad_fn=grad_fn):
        loss, grads = grad_fn(model, second(optimizer), x, y)
        optimizer.update(model, grads)
        return loss

      x, y = ref.batches(seed=23, steps=1, sizes=(5, 6, 3))[0]
      step(model, optimizer, x, y)
      results.append((params_of(model), count_of(model)))
    assert max_abs_diff(results[0][0], results[1][0]) == 0.0
    assert results[0][1] == results[1][1] == 2


def test_optimizer_wrt_selects_what_is_differentiated():
  """An optimizer of the second linear layer alone: only its Variables get gradients."""

  class Head(nnx.Param):
    pass

  with jax.enable_x64(True):
    model = float64_stats(BNNet(nnx.Rngs(0)))
    model.linear2.kernel = Head(model.linear2.kernel.get_value())
    tx = optax.chain(fsam_optax.sam(rho=0.1), optax.sgd(LR))
    optimizer = nnx.Optimizer(model, tx, wrt=Head)
    before = params_of(model)
    grad_fn = fsam_optax.sam_value_and_grad(lambda m, x, y: jnp.mean((m(x) - y) ** 2))
    x = jax.random.normal(jax.random.key(1), (8, 5))
    _, grads = nnx.jit(grad_fn)(model, optimizer, x, jnp.zeros((8, 3)))
    assert list(traverse_util.flatten_dict(nnx.to_pure_dict(grads), sep="/")) == ["linear2/kernel"]
    optimizer.update(model, grads)
    after = params_of(model)
    assert [k for k in before if not np.array_equal(before[k], after[k])] == ["linear2/kernel"]


# ---- Sharded parameters under nnx.jit, against one device ----


def fsdp_spec(v: jax.Array) -> P:
  """Each parameter split over "data" along its last even axis (FSDP); the rest replicated."""
  even = [i for i, n in enumerate(v.shape) if n % 2 == 0]
  return P(*("data" if i == even[-1] else None for i in range(v.ndim))) if even else P()


def model_spec(v: jax.Array) -> P:
  """Each parameter's last axis split over "model" where it divides (tensor parallelism)."""
  return P(*("model" if i == v.ndim - 1 and v.shape[i] % 2 == 0 else None for i in range(v.ndim)))


def gathered_loss(model, x, y):
  """An Explicit mesh makes FSDP's gather the loss's to write: every parameter, first."""
  params = nnx.state(model, nnx.Param)
  nnx.update(model, jax.tree.map(lambda v: jax.sharding.reshard(v, P()), params))
  return loss_fn(model, x, y)


LAYOUTS = {
  "fsdp": ((2,), ("data",), fsdp_spec),
  "data_x_model": ((2, 2), ("data", "model"), model_spec),
}


def run_sharded(name, data, layout=None, axis_type=AxisType.Auto):
  """(params, statistics, count) after each step, the model sharded as ``layout`` says."""
  model = new_model()
  fun, mesh = loss_fn, None
  if layout is not None:
    shape, axes, spec = LAYOUTS[layout]
    devices = jax.devices()[: int(np.prod(shape))]
    mesh = jax.make_mesh(shape, axes, axis_types=(axis_type,) * len(axes), devices=devices)
    params = nnx.state(model, nnx.Param)
    nnx.update(
      model, jax.tree.map(lambda v: jax.device_put(v, NamedSharding(mesh, spec(v))), params)
    )
    if layout == "fsdp" and axis_type == AxisType.Explicit:
      fun = gathered_loss
  tx = optax.chain(METHODS[name][0](), optax.sgd(LR, momentum=MOMENTUM))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  grad_fn = fsam_optax.sam_value_and_grad(fun)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    loss, grads = grad_fn(model, optimizer, x, y)
    optimizer.update(model, grads)
    return loss

  path = []
  with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):
    for x, y in data:
      if mesh is not None:
        x, y = (jax.device_put(a, NamedSharding(mesh, P("data"))) for a in (x, y))
      train_step(model, optimizer, x, y)
      path.append((params_of(model), stats_of(model), count_of(model)))
  if mesh is not None:
    kernel = model.linear1.kernel.get_value()
    assert kernel.sharding.spec == LAYOUTS[layout][2](kernel)  # still split as it was
  return path


@pytest.mark.parametrize("name", ["fsam", "looksam"])
def test_sharded_parameters_equal_one_device(name):
  """FSDP and data x model, on Auto and Explicit mesh axes, equal the model on one device."""
  with jax.enable_x64(True):
    data = ref.batches(seed=24, steps=8, sizes=(5, 6, 3))
    one = run_sharded(name, data)
    for layout in LAYOUTS:
      for axis_type in (AxisType.Auto, AxisType.Explicit):
        got = run_sharded(name, data, layout, axis_type)
        for g, w in zip(got, one, strict=True):
          assert max_abs_diff(g[0], w[0]) < 1e-14, (layout, axis_type)
          assert max(float(np.max(np.abs(a - b))) for a, b in zip(g[1], w[1], strict=True)) < 1e-14
          assert g[2] == w[2]


# ---- Misuse ----


def test_model_and_optimizer_swapped_say_which_goes_first():
  model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.chain(fsam_optax.sam(), optax.sgd(0.1)), wrt=nnx.Param)
  grad_fn = fsam_optax.sam_value_and_grad(lambda m, x: jnp.sum(m(x)))
  with pytest.raises(TypeError, match=r"pass the model first.*grad_fn\(model, optimizer"):
    grad_fn(optimizer, model, jnp.ones((1, 2)))


def test_model_state_in_place_of_the_optimizer_says_what_to_pass():
  model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.chain(fsam_optax.sam(), optax.sgd(0.1)), wrt=nnx.Param)
  grad_fn = fsam_optax.sam_value_and_grad(lambda m, x: jnp.sum(m(x)))
  with pytest.raises(ValueError, match=r"Pass the `nnx.Optimizer` itself or `optimizer.opt_state`"):
    grad_fn(model, nnx.state(optimizer), jnp.ones((1, 2)))


def test_opt_state_of_an_optimizer_with_another_wrt_says_to_pass_the_optimizer():
  class Head(nnx.Param):
    pass

  model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
  model.kernel = Head(model.kernel.get_value())
  optimizer = nnx.Optimizer(model, optax.chain(fsam_optax.fsam(), optax.sgd(0.1)), wrt=Head)
  grad_fn = fsam_optax.sam_value_and_grad(lambda m, x: jnp.sum(m(x)))
  with pytest.raises(ValueError, match=r"built for other Variables.*pass the nnx.Optimizer"):
    grad_fn(model, optimizer.opt_state, jnp.ones((1, 2)))
  grad_fn(model, optimizer, jnp.ones((1, 2)))  # the optimizer itself: its wrt
  # SAM keeps no buffer of its own; the base optimizer's momentum tells.
  tx = optax.chain(fsam_optax.sam(), optax.sgd(0.1, momentum=0.9))
  optimizer = nnx.Optimizer(model, tx, wrt=Head)
  with pytest.raises(ValueError, match=r"built for other Variables"):
    grad_fn(model, optimizer.opt_state, jnp.ones((1, 2)))


def test_a_wrt_that_selects_integer_variables_is_refused_by_path():
  class Counter(nnx.Variable):
    pass

  model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
  model.calls = Counter(jnp.zeros((), jnp.int32))
  tx = optax.chain(fsam_optax.sam(), optax.sgd(0.1))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Any(nnx.Param, Counter))
  grad_fn = fsam_optax.sam_value_and_grad(lambda m, x: jnp.sum(m(x)))
  with pytest.raises(ValueError, match=r"Variable at \['calls'\].*int32.*`wrt`"):
    grad_fn(model, optimizer, jnp.ones((1, 2)))


def test_inside_shard_map_a_whole_model_is_refused_with_the_split_recipe():
  model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.chain(fsam_optax.sam(), optax.sgd(0.1)), wrt=nnx.Param)
  grad_fn = fsam_optax.sam_value_and_grad(lambda m, x: jnp.sum(m(x)), axis_name="data")
  with pytest.raises(ValueError, match=r"under jit.*nnx.split\(model, nnx.Param"):
    grad_fn(model, optimizer, jnp.ones((1, 2)))


def test_the_package_does_not_import_nnx():
  code = "import sys, fsam_optax; assert 'flax.nnx' not in sys.modules, 'flax.nnx imported'"
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr


# ---- Variables the forward pass reads and writes ----


class Counted(nnx.Module):
  """A linear layer whose output is scaled by how often it ran: read, then written."""

  def __init__(self, rngs: nnx.Rngs):
    self.linear = nnx.Linear(3, 1, param_dtype=jnp.float64, rngs=rngs)
    self.calls = nnx.BatchStat(jnp.ones((), jnp.float64))

  def __call__(self, x):
    out = self.linear(x) * self.calls[...]
    self.calls[...] += 1.0
    return out


def counted_loss(model, x):
  return jnp.mean(model(x) ** 2)


def test_both_passes_read_the_model_as_the_clean_pass_found_it():
  """g' is taken with the Variables the step began with; the model keeps the clean pass's."""
  with jax.enable_x64(True):
    model = Counted(nnx.Rngs(0))
    tx = optax.chain(fsam_optax.sam(rho=0.3), optax.sgd(LR))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x = jax.random.normal(jax.random.key(1), (8, 3))
    model.calls[...] = 3.0
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))

    def by_hand(p, calls):
      return jnp.mean(((x @ p["linear"]["kernel"] + p["linear"]["bias"][None]) * calls) ** 2)

    g = jax.grad(by_hand)(params, 3.0)
    norm = jnp.sqrt(sum(jnp.sum(v**2) for v in jax.tree.leaves(g)))
    moved = jax.tree.map(lambda p, v: p + 0.3 * v / (norm + 1e-12), params, g)
    want = jax.grad(by_hand)(moved, 3.0)  # not 4.0, what the clean pass left

    grad_fn = fsam_optax.sam_value_and_grad(counted_loss)
    _, grads = nnx.jit(grad_fn)(model, optimizer, x)
    got = nnx.to_pure_dict(fsam_optax.base_grads(grads))
    assert max_abs_diff(traverse_util.flatten_dict(got), traverse_util.flatten_dict(want)) < 1e-14
    assert float(model.calls[...]) == 4.0  # one pass's write, the clean pass's


class Recording(Counted):
  """Keeps its last output in a Variable it creates on its first call."""

  def __call__(self, x):
    out = super().__call__(x)
    self.last = nnx.Intermediate(out)
    return out


def test_micro_batches_refuse_a_loss_that_adds_variables():
  with jax.enable_x64(True):
    model = Recording(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.chain(fsam_optax.sam(), optax.sgd(LR)), wrt=nnx.Param)
    grad_fn = fsam_optax.sam_value_and_grad(counted_loss, micro_batches=2)
    with pytest.raises(ValueError, match=r"micro_batches.*changes their structure"):
      grad_fn(model, optimizer, jnp.ones((4, 3)))


@pytest.mark.parametrize(
  "loss, first, fix",
  [
    # A loss written for a tree of parameters, given the model.
    (lambda p, x: jnp.sum(x @ p["kernel"]), "model", "If fun takes parameters"),
    # A loss written for the model, given its split parameters.
    (lambda m, x: jnp.sum(m(x)), "params", r"pass the model itself first"),
  ],
)
def test_loss_whose_first_argument_is_not_what_it_is_given(loss, first, fix):
  model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.chain(fsam_optax.sam(), optax.sgd(0.1)), wrt=nnx.Param)
  given = model if first == "model" else nnx.state(model, nnx.Param)
  grad_fn = fsam_optax.sam_value_and_grad(loss)
  with pytest.raises(TypeError, match=rf"fun failed on its first argument, a \w+ .*{fix}"):
    grad_fn(given, optimizer.opt_state, jnp.ones((1, 2)))
