"""Equinox in its own idiom: ``grad_fn(model, opt_state, *args)`` inside ``eqx.filter_jit``.

A whole Equinox model goes to the gradient function, ``tx.init`` takes
``eqx.filter(model, eqx.is_array)`` and the updates go to ``eqx.apply_updates``. Trained
for 32 steps, the model is compared, in float64, with the same network written by hand
as a function of a dict of arrays, driven by the NumPy statements of the methods in
``tests/reference.py``: its inexact arrays are trained, its other leaves (a function, a
string, a Python number, an integer array) pass through unchanged; eqx.nn.BatchNorm's
state, an argument of the loss, reaches both passes as it was passed, and the one returned
through ``has_aux`` is the clean pass's.
"""

from __future__ import annotations

import dataclasses
import functools
import subprocess
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fsam_optax
from tests import reference as ref
from tests.jax_mlp import METHOD_PAIRS as METHODS
from tests.jax_mlp import max_abs_diff

eqx = pytest.importorskip("equinox")

STEPS = 32
LR, MOMENTUM = 0.05, 0.9
TEMPERATURE = 0.5
SCALE = np.array([1, 2, 3], np.int32)  # the output's divisor, an integer array of the model
BN_MOMENTUM, BN_EPS = 0.99, 1e-5  # eqx.nn.BatchNorm's defaults
TOL = 1e-12


class MLP(eqx.Module):
  """A tanh MLP with leaves that are not trained: a function, a string, a float, an int array."""

  linear1: eqx.nn.Linear
  linear2: eqx.nn.Linear
  activation: Callable[[jax.Array], jax.Array]
  name: str
  temperature: float
  scale: jax.Array

  def __init__(self, key: jax.Array):
    key1, key2 = jax.random.split(key)
    self.linear1 = eqx.nn.Linear(5, 6, key=key1)
    self.linear2 = eqx.nn.Linear(6, 3, key=key2)
    self.activation = jnp.tanh
    self.name = "mlp"
    self.temperature = TEMPERATURE
    self.scale = jnp.asarray(SCALE)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.linear2(self.activation(self.temperature * self.linear1(x))) / self.scale


def loss_fn(model: MLP, x: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.mean((jax.vmap(model)(x) - y) ** 2)


class BNNet(eqx.Module):
  linear1: eqx.nn.Linear
  bn: eqx.nn.BatchNorm
  linear2: eqx.nn.Linear

  def __init__(self, key: jax.Array, mode: str):
    key1, key2 = jax.random.split(key)
    self.linear1 = eqx.nn.Linear(5, 6, key=key1)
    self.bn = eqx.nn.BatchNorm(6, axis_name="batch", mode=mode)
    self.linear2 = eqx.nn.Linear(6, 3, key=key2)

  def __call__(self, x: jax.Array, state: eqx.nn.State) -> tuple[jax.Array, eqx.nn.State]:
    h, state = self.bn(self.linear1(x), state)
    return self.linear2(jnp.tanh(h)), state


def bn_loss(model: BNNet, state: eqx.nn.State, x: jax.Array, y: jax.Array):
  batched = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
  out, state = batched(x, state)
  return jnp.mean((out - y) ** 2), state


def params_of(model: eqx.Module) -> dict:
  """The trained arrays by path (".linear1.weight", ...), as NumPy."""
  leaves = jax.tree_util.tree_leaves_with_path(eqx.filter(model, eqx.is_inexact_array))
  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def stats_of(model: BNNet, state: eqx.nn.State) -> tuple[np.ndarray, np.ndarray]:
  """BatchNorm's running mean and (biased) variance."""
  index = model.bn.batch_state_index if model.bn.mode == "batch" else model.bn.ema_state_index
  return tuple(np.asarray(stat) for stat in state.get(index))


def is_pair(x) -> bool:
  return isinstance(x, fsam_optax.SAMGrad)


# ---- The reference: the same networks on a dict of arrays ----


def dense(p: dict, name: str, h):
  return h @ p[f".{name}.weight"].T + p[f".{name}.bias"][None]


def mlp(p: dict, x):
  return dense(p, "linear2", jnp.tanh(TEMPERATURE * dense(p, "linear1", x))) / SCALE[None]


def bn_stats(h, running: tuple, mode: str, first: bool) -> tuple[tuple, tuple]:
  """What eqx.nn.BatchNorm normalises a batch with, and the running statistics it keeps.

  ``mode="batch"``: the batch's mean and (biased) variance, and their moving averages.
  ``mode="ema"``: the moving averages for both (the batch's own on the first batch).
  """
  batch = (h.mean(0), h.var(0))
  averaged = tuple(
    BN_MOMENTUM * old + (1 - BN_MOMENTUM) * new for old, new in zip(running, batch, strict=True)
  )
  if mode == "batch":
    return batch, averaged
  return (batch, batch) if first else (averaged, averaged)


def bn_net(p: dict, x, running: tuple, mode: str, first: bool):
  h = dense(p, "linear1", x)
  (mean, var), _ = bn_stats(h, running, mode, first)
  h = (h - mean[None]) / jnp.sqrt(var[None] + BN_EPS)
  return dense(p, "linear2", jnp.tanh(h * p[".bn.weight"][None] + p[".bn.bias"][None]))


@jax.jit
def mlp_grad(p: dict, x, y) -> dict:
  return jax.grad(lambda p: jnp.mean((mlp(p, x) - y) ** 2))(p)


@functools.partial(jax.jit, static_argnames=("mode", "first"))
def bn_net_grad(p: dict, x, y, running: tuple, mode: str, first: bool) -> dict:
  return jax.grad(lambda p: jnp.mean((bn_net(p, x, running, mode, first) - y) ** 2))(p)


def as_numpy(tree: dict) -> dict:
  return {k: np.asarray(v) for k, v in tree.items()}


def mlp_path(method, theta: dict, data: list) -> list[dict]:
  """A method then momentum SGD on the MLP: the params after each step."""
  base = ref.SGDReference(LR, MOMENTUM, weight_decay=0.0)
  path = []
  for x, y in data:
    grad_at = lambda w, x=x, y=y: as_numpy(mlp_grad(w, x, y))
    theta = base.step(theta, method.gradient(theta, grad_at))
    path.append(theta)
  return path


@dataclasses.dataclass
class BNReference:
  """A method then momentum SGD on the BatchNorm network, with its running statistics.

  Both passes start from the statistics the step is given (``perturbed_from="input"``,
  the gradient function's rule), or the perturbed pass from those the clean pass leaves
  (``"clean"``, a rule the tests must tell apart). The statistics kept are the clean
  pass's (at the step's ``theta``); to show that they can be told apart, ``run`` also
  follows those the perturbed passes would keep (at the last point the method asks for).
  """

  mode: str
  running: tuple
  perturbed_from: str = "input"

  def run(self, method, theta: dict, data: list) -> list[tuple[dict, tuple, tuple]]:
    base = ref.SGDReference(LR, MOMENTUM, weight_decay=0.0)
    running, perturbed_running, first = self.running, self.running, True
    path = []
    for x, y in data:
      points = []

      def grad_at(w, x=x, y=y, points=points, running=running, first=first):
        if points and self.perturbed_from == "clean":
          running, first = self.after(points[0], x, running, first), False
        points.append(w)
        return as_numpy(bn_net_grad(w, x, y, running, self.mode, first))

      new_theta = base.step(theta, method.gradient(theta, grad_at))
      perturbed_running = self.after(points[-1], x, perturbed_running, first)
      running, first = self.after(theta, x, running, first), False
      theta = new_theta
      path.append((theta, running, perturbed_running))
    return path

  def after(self, theta: dict, x, running: tuple, first: bool) -> tuple:
    """The running statistics after a batch at ``theta``."""
    h = np.asarray(dense(theta, "linear1", x))
    return bn_stats(h, running, self.mode, first)[1]


# ---- The Equinox idiom ----


def make_tx(method) -> optax.GradientTransformation:
  return optax.chain(method, optax.sgd(LR, momentum=MOMENTUM))


def run_mlp(
  method, data, traces: list | None = None, init_with=eqx.is_array
) -> tuple[list[dict], MLP, object]:
  """The Equinox idiom: the params after each step, the model, the last grads.

  ``tx.init`` takes ``eqx.filter(model, init_with)``. With ``traces`` (a list), the
  SAM-or-one-pass choice is made on the host and each trace of the step appends its
  choice there.
  """
  model = MLP(jax.random.key(0))
  tx = make_tx(method)
  opt_state = tx.init(eqx.filter(model, init_with))
  grad_fn = fsam_optax.sam_value_and_grad(loss_fn)

  @eqx.filter_jit
  def step(model, opt_state, x, y, sam_step):
    if traces is not None:
      traces.append(sam_step)
    _, grads = grad_fn(model, opt_state, x, y, sam_step=sam_step)
    updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_array))
    return eqx.apply_updates(model, updates), opt_state, grads

  path = []
  for i, (x, y) in enumerate(data):
    sam_step = None if traces is None else fsam_optax.is_sam_step(opt_state, i)
    model, opt_state, grads = step(model, opt_state, x, y, sam_step)
    path.append(params_of(model))
  return path, model, grads


def run_bn_net(method, data, mode: str) -> list[tuple[dict, tuple, int]]:
  """The Equinox idiom with state through has_aux: the params, BatchNorm's running
  statistics and count of batches after each step."""
  model, state = eqx.nn.make_with_state(BNNet)(jax.random.key(0), mode)
  tx = make_tx(method)
  opt_state = tx.init(eqx.filter(model, eqx.is_array))
  grad_fn = fsam_optax.sam_value_and_grad(bn_loss, has_aux=True)

  @eqx.filter_jit
  def step(model, state, opt_state, x, y):
    (_, state), grads = grad_fn(model, opt_state, state, x, y)
    updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_array))
    return eqx.apply_updates(model, updates), state, opt_state

  path = []
  for x, y in data:
    model, state, opt_state = step(model, state, opt_state, x, y)
    count = int(state.get(model.bn.batch_counter)) if mode == "batch" else None
    path.append((params_of(model), stats_of(model, state), count))
  return path


def bn_reference(mode: str, data: list, perturbed_from: str = "input") -> list:
  """``BNReference.run`` with F-SAM from the model's start."""
  model, state = eqx.nn.make_with_state(BNNet)(jax.random.key(0), mode)
  fsam = METHODS["fsam"][1]()
  return BNReference(mode, stats_of(model, state), perturbed_from).run(fsam, params_of(model), data)


def worst(pairs) -> float:
  """The largest absolute difference between the arrays of each pair of tuples."""
  return max(
    float(np.max(np.abs(a - b))) for got, want in pairs for a, b in zip(got, want, strict=True)
  )


@pytest.mark.parametrize("name", list(METHODS))
def test_each_method_trains_the_inexact_arrays_as_the_reference_does(name):
  method, reference = METHODS[name]
  with jax.enable_x64(True):
    data = ref.batches(seed=31, steps=STEPS, sizes=(5, 6, 3))
    got, model, grads = run_mlp(method(), data)
    want = mlp_path(reference(), params_of(MLP(jax.random.key(0))), data)
    _, eqx_grads = eqx.filter_value_and_grad(loss_fn)(model, *data[0])
  # Absolute errors: every leaf is of order one.
  assert max(max_abs_diff(g, w) for g, w in zip(got, want, strict=True)) < TOL
  # The leaves that are not inexact arrays come out as they went in.
  assert model.activation is jnp.tanh and model.name == "mlp" and model.temperature == TEMPERATURE
  assert model.scale.dtype == jnp.int32 and np.array_equal(model.scale, SCALE)
  # A pair where eqx.filter_value_and_grad has a gradient, None where it has None.
  assert jax.tree.structure(grads, is_leaf=is_pair) == jax.tree.structure(eqx_grads)


def test_the_host_choice_under_filter_jit_equals_the_device_schedule():
  with jax.enable_x64(True):
    data = ref.batches(seed=8, steps=10, sizes=(5, 6, 3))
    traces: list = []
    looksam = lambda: fsam_optax.looksam(rho=0.2, every=5, alpha=0.7)
    # Inexact arrays only: optax's momentum of an integer leaf would become None after
    # the first update and retrace the step, with or without SAM.
    host, _, _ = run_mlp(looksam(), data, traces, init_with=eqx.is_inexact_array)
    device, _, _ = run_mlp(looksam(), data, init_with=eqx.is_inexact_array)
  assert traces == [True, False]  # eqx.filter_jit keeps the bool static: one trace each
  assert max(max_abs_diff(got, want) for got, want in zip(host, device, strict=True)) < TOL


def test_batchnorm_state_returned_is_the_clean_pass_s():
  """With ``mode="batch"`` the state does not change the gradients; the state returned is
  the clean pass's, whose statistics are those of the params before the step."""
  with jax.enable_x64(True):
    data = ref.batches(seed=32, steps=STEPS, sizes=(5, 6, 3))
    got = run_bn_net(METHODS["fsam"][0](), data, mode="batch")
    want = bn_reference("batch", data)
  # Absolute errors: linear1's bias feeds BatchNorm, so its gradient is zero up to rounding.
  assert max(max_abs_diff(g[0], w[0]) for g, w in zip(got, want, strict=True)) < TOL
  assert worst((g[1], w[1]) for g, w in zip(got, want, strict=True)) < TOL
  assert [g[2] for g in got] == list(range(1, STEPS + 1))  # a batch counted a step
  # The statistics the perturbed passes would keep are far from these: the check can fail.
  assert worst((g[1], w[2]) for g, w in zip(got, want, strict=True)) > 1e-4


def test_both_passes_start_from_the_state_passed_in():
  """With ``mode="ema"`` BatchNorm normalises with the running statistics, so the gradients
  show which state each pass starts from: the perturbed pass starts from the state passed
  in, not from the one the clean pass returns."""
  with jax.enable_x64(True):
    data = ref.batches(seed=34, steps=STEPS, sizes=(5, 6, 3))
    got = run_bn_net(METHODS["fsam"][0](), data, mode="ema")
    want = bn_reference("ema", data)
    chained = bn_reference("ema", data, perturbed_from="clean")
  assert max(max_abs_diff(g[0], w[0]) for g, w in zip(got, want, strict=True)) < TOL
  assert worst((g[1], w[1]) for g, w in zip(got, want, strict=True)) < TOL
  # Had the perturbed pass started from the clean pass's state, the params would differ.
  assert max(max_abs_diff(g[0], c[0]) for g, c in zip(got, chained, strict=True)) > 1e-6


def test_grads_go_to_tx_update_and_apply_updates_as_eqx_grads_do():
  """``tx.update`` takes the grads with ``eqx.filter(model, eqx.is_array)`` (its integer array
  included) and gives updates that ``eqx.apply_updates`` applies, shaped as eqx's grads."""
  with jax.enable_x64(True):
    model = MLP(jax.random.key(0))
    x, y = ref.batches(seed=33, steps=1, sizes=(5, 6, 3))[0]
    tx = make_tx(fsam_optax.fsam(rho=0.2, sigma=1.0, lmbda=0.6))
    opt_state = tx.init(eqx.filter(model, eqx.is_array))
    loss, grads = eqx.filter_jit(fsam_optax.sam_value_and_grad(loss_fn))(model, opt_state, x, y)
    eqx_loss, eqx_grads = eqx.filter_value_and_grad(loss_fn)(model, x, y)
    updates, _ = tx.update(grads, opt_state, eqx.filter(model, eqx.is_array))
    new_model = eqx.apply_updates(model, updates)
  assert jax.tree.structure(grads, is_leaf=is_pair) == jax.tree.structure(eqx_grads)
  # The clean pass is eqx.filter_value_and_grad's.
  assert abs(float(loss) - float(eqx_loss)) < 1e-15
  # F-SAM's first moving average is the clean gradient g (m_1 = g).
  first_average = jax.tree.map(lambda p: p.buffer, grads, is_leaf=is_pair)
  assert max_abs_diff(params_of(first_average), params_of(eqx_grads)) < 1e-15
  assert jax.tree.structure(updates) == jax.tree.structure(eqx_grads)
  assert jax.tree.structure(new_model) == jax.tree.structure(model)
  assert max_abs_diff(params_of(new_model), params_of(model)) > 0  # the weights moved


def test_the_package_does_not_import_equinox():
  code = "import fsam_optax, sys; assert 'equinox' not in sys.modules"
  subprocess.run([sys.executable, "-c", code], check=True)
