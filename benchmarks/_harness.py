"""Shared pieces of the benchmark scripts: models, the compared steps, timing.

Every script compares training steps that differ only in how the gradient is
made: plain SGD (one pass), a hand-written SAM step, ``optax.contrib.sam`` in
opaque mode, and this package's F-SAM. All use the same base optimizer and
donate their parameters and optimizer state, so the ratios isolate the cost
of the gradient and of the F-SAM bookkeeping.
"""

from __future__ import annotations

import importlib.metadata
import os
import pathlib
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

# Measure the checkout this file belongs to, not another installed copy.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import fsam_optax

RHO = 0.2
SIGMA = 1.0
LMBDA = 0.6
EPS = 1e-12
LEARNING_RATE = 0.05
MOMENTUM = 0.9

Batch = tuple[jax.Array, jax.Array]
Step = Callable[[Any, Any, Batch], tuple[Any, Any, jax.Array]]


# --------------------------------------------------------------------- models


class Model(NamedTuple):
  """A classifier as plain functions, so every step variant traces the same maths."""

  name: str
  init: Callable[[jax.Array], Any]
  apply: Callable[[Any, jax.Array], jax.Array]
  input_shape: tuple[int, ...]  # one example, channels last
  batch_size: int


def _dense_init(key: jax.Array, fan_in: int, fan_out: int) -> dict[str, jax.Array]:
  w = jax.random.normal(key, (fan_in, fan_out)) * np.sqrt(2.0 / fan_in)
  return {"w": w, "b": jnp.zeros(fan_out)}


def _conv_init(key: jax.Array, c_in: int, c_out: int) -> dict[str, jax.Array]:
  w = jax.random.normal(key, (3, 3, c_in, c_out)) * np.sqrt(2.0 / (9 * c_in))
  return {"w": w, "b": jnp.zeros(c_out)}


def mlp(width: int = 1024, batch_size: int = 256) -> Model:
  """784 -> width -> width -> 10 with ReLU; width 1024 gives 1.86M parameters."""
  sizes = [784, width, width, 10]

  def init(key: jax.Array) -> list[dict[str, jax.Array]]:
    keys = jax.random.split(key, len(sizes) - 1)
    return [_dense_init(k, a, b) for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=True)]

  def apply(params: list[dict[str, jax.Array]], x: jax.Array) -> jax.Array:
    for layer in params[:-1]:
      x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]

  return Model(f"MLP 784-{width}-{width}-10", init, apply, (784,), batch_size)


CNN_STRIDES = (1, 2, 2)


def cnn(channels: Sequence[int] = (16, 32, 32), batch_size: int = 64) -> Model:
  """Three 3x3 conv layers (strides 1, 2, 2), global mean pool, linear head.

  Input is CIFAR-shaped (32x32x3, NHWC).
  """
  chans = [3, *channels]

  def init(key: jax.Array) -> dict[str, Any]:
    keys = jax.random.split(key, len(channels) + 1)
    convs = [_conv_init(k, a, b) for k, a, b in zip(keys[:-1], chans[:-1], chans[1:], strict=True)]
    return {"convs": convs, "head": _dense_init(keys[-1], chans[-1], 10)}

  def apply(params: dict[str, Any], x: jax.Array) -> jax.Array:
    for layer, stride in zip(params["convs"], CNN_STRIDES, strict=True):
      x = jax.lax.conv_general_dilated(
        x, layer["w"], (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
      )
      x = jax.nn.relu(x + layer["b"])
    x = jnp.mean(x, axis=(1, 2))
    return x @ params["head"]["w"] + params["head"]["b"]

  name = "CNN conv" + "-".join(str(c) for c in channels)
  return Model(name, init, apply, (32, 32, 3), batch_size)


def make_loss(model: Model) -> Callable[[Any, Batch], jax.Array]:
  def loss_fn(params: Any, batch: Batch) -> jax.Array:
    x, y = batch
    logits = model.apply(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return loss_fn


def synthetic_batch(
  batch_size: int, input_shape: tuple[int, ...], num_classes: int = 10, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
  """A fixed random batch (float32 inputs, int32 labels), as NumPy arrays."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch_size, *input_shape), dtype=np.float32)
  y = rng.integers(0, num_classes, batch_size).astype(np.int32)
  return x, y


def make_batch(model: Model) -> tuple[np.ndarray, np.ndarray]:
  return synthetic_batch(model.batch_size, model.input_shape)


def param_count(params: Any) -> int:
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


def tree_bytes(tree: Any) -> int:
  return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree))


# ---------------------------------------------------------------------- steps


def base_optimizer() -> optax.GradientTransformation:
  return optax.sgd(LEARNING_RATE, momentum=MOMENTUM)


class Variant(NamedTuple):
  """An unjitted training step and the initialiser of the state it carries.

  With ``host_choice`` the step takes a keyword ``sam_step``, the SAM-or-one-pass
  choice of this package's gradient function: static under jit, and made on
  the host before each step by :class:`Runner` with ``fsam_optax.is_sam_step``.
  """

  step: Step
  init: Callable[[Any], Any]
  host_choice: bool = False


def sgd_variant(loss_fn: Callable) -> Variant:
  tx = base_optimizer()

  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return Variant(step, tx.init)


def hand_sam_variant(loss_fn: Callable) -> Variant:
  """SAM written out: two value_and_grad calls and a global-norm perturbation."""
  tx = base_optimizer()

  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    scale = RHO / (optax.tree.norm(grads) + EPS)
    perturbed = jax.tree.map(lambda p, g: p + scale * g, params, grads)
    _, base_grads = jax.value_and_grad(loss_fn)(perturbed, batch)
    updates, opt_state = tx.update(base_grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return Variant(step, tx.init)


class HandFSAMState(NamedTuple):
  """The state of the hand-written F-SAM step: step count, moving average, base state."""

  count: jax.Array
  ema: Any
  base: optax.OptState


def hand_fsam_variant(loss_fn: Callable) -> Variant:
  """F-SAM written out in plain JAX, as the official step: the algorithm's own cost.

  The first step perturbs along ``g`` and starts the average at ``g``; later
  steps use ``d = g - sigma m`` and then ``m = lmbda m + (1 - lmbda) g``. Both
  rules are written out, as in the official step, so this is the step whose
  times docs/results/step_time.md reports.
  """
  base = base_optimizer()

  def init(params: Any) -> HandFSAMState:
    zeros = jax.tree.map(jnp.zeros_like, params)
    return HandFSAMState(jnp.zeros([], jnp.int32), zeros, base.init(params))

  def step(params, state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    first = state.count == 0
    d = jax.tree.map(lambda g, m: jnp.where(first, g, g - SIGMA * m), grads, state.ema)
    scale = RHO / (optax.tree.norm(d) + EPS)
    perturbed = jax.tree.map(lambda p, d: p + scale * d, params, d)
    _, base_grads = jax.value_and_grad(loss_fn)(perturbed, batch)
    ema = jax.tree.map(
      lambda m, g: jnp.where(first, g, LMBDA * m + (1 - LMBDA) * g), state.ema, grads
    )
    updates, base_state = base.update(base_grads, state.base, params)
    new_state = HandFSAMState(state.count + 1, ema, base_state)
    return optax.apply_updates(params, updates), new_state, loss

  return Variant(step, init)


class HandLookSAMState(NamedTuple):
  """The state of the hand-written LookSAM step: step count, ``g_v``, base state."""

  count: jax.Array
  g_v: Any
  base: optax.OptState


def hand_looksam_variant(loss_fn: Callable, every: int = 5, alpha: float = 0.7) -> Variant:
  """LookSAM written out in plain JAX, one ``lax.cond`` on the step: the algorithm's own cost.

  On steps ``0, every, 2 every, ...`` SAM's step, keeping ``g_v``, the part of
  ``g'`` orthogonal to ``g``; between, one pass and ``g + alpha ||g|| / ||g_v|| g_v``.
  """
  base = base_optimizer()

  def init(params: Any) -> HandLookSAMState:
    zeros = jax.tree.map(jnp.zeros_like, params)
    return HandLookSAMState(jnp.zeros([], jnp.int32), zeros, base.init(params))

  def step(params, state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    norm = optax.tree.norm(grads)

    def sam() -> tuple[Any, Any]:
      scale = RHO / (norm + EPS)
      perturbed = jax.tree.map(lambda p, g: p + scale * g, params, grads)
      base_grads = jax.grad(loss_fn)(perturbed, batch)
      proj = optax.tree.vdot(grads, base_grads) / (norm**2 + EPS)
      g_v = jax.tree.map(lambda gp, g: gp - proj * g, base_grads, grads)
      return base_grads, g_v

    def reuse() -> tuple[Any, Any]:
      scale = alpha * norm / (optax.tree.norm(state.g_v) + EPS)
      return jax.tree.map(lambda g, v: g + scale * v, grads, state.g_v), state.g_v

    used, g_v = jax.lax.cond(state.count % every == 0, sam, reuse)
    updates, base_state = base.update(used, state.base, params)
    new_state = HandLookSAMState(state.count + 1, g_v, base_state)
    return optax.apply_updates(params, updates), new_state, loss

  return Variant(step, init)


def contrib_sam_variant(loss_fn: Callable) -> Variant:
  """``optax.contrib.sam`` in opaque mode, the drop-in SAM of its docstring."""
  adversary = optax.chain(optax.contrib.normalize(), optax.sgd(RHO))
  tx = optax.contrib.sam(base_optimizer(), adversary, sync_period=2, opaque_mode=True)

  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    grad_fn = lambda p, _: jax.grad(loss_fn)(p, batch)
    updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), opt_state, loss

  return Variant(step, tx.init)


def fsam_variant(loss_fn: Callable, host_choice: bool = False, **schedule: Any) -> Variant:
  """This package's F-SAM; ``schedule`` (``every``, ``probability``, ``seed``) opts in."""
  fsam = fsam_optax.fsam(rho=RHO, sigma=SIGMA, lmbda=LMBDA, eps=EPS, **schedule)
  return method_variant(loss_fn, fsam, host_choice)


def looksam_every_5() -> optax.GradientTransformation:
  """This package's LookSAM at its paper's settings: the SAM step every 5th step, alpha 0.7."""
  return fsam_optax.looksam(RHO, every=5, alpha=0.7, eps=EPS)


def method_variant(
  loss_fn: Callable, method: optax.GradientTransformation, host_choice: bool = False
) -> Variant:
  """One of this package's methods in front of the base optimizer, fed by its helper.

  ``host_choice``: the step takes ``sam_step`` (see :class:`Variant`); otherwise
  it leaves the choice to the state's schedule, on the device.
  """
  tx = optax.chain(method, base_optimizer())
  grad_fn = fsam_optax.sam_value_and_grad(loss_fn)

  def step(params, opt_state, batch, sam_step=None):
    loss, grads = grad_fn(params, opt_state, batch, sam_step=sam_step)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return Variant(step, tx.init, host_choice)


VARIANTS: dict[str, Callable[[Callable], Variant]] = {
  "F-SAM (fsam_optax)": fsam_variant,
  "F-SAM (hand-written)": hand_fsam_variant,
  "SAM (hand-written)": hand_sam_variant,
  "optax.contrib.sam (opaque)": contrib_sam_variant,
  "SGD (one pass)": sgd_variant,
}


# The opt-in cheaper schedules, measured beside the every-step variants.
SCHEDULED: dict[str, Callable[[Callable], Variant]] = {
  "F-SAM every 2nd step": lambda loss_fn: fsam_variant(loss_fn, every=2),
  "F-SAM probability 0.5": lambda loss_fn: fsam_variant(loss_fn, probability=0.5, seed=0),
}


# The SAM family beside F-SAM, at the settings their papers publish.
FAMILY: dict[str, Callable[[Callable], Variant]] = {
  "SAM (fsam_optax)": lambda f: method_variant(f, fsam_optax.sam(RHO, eps=EPS)),
  "GSAM (fsam_optax)": lambda f: method_variant(f, fsam_optax.gsam(RHO, 0.4, eps=EPS)),
  "VaSSO (fsam_optax)": lambda f: method_variant(f, fsam_optax.vasso(RHO, 0.4)),
  "LookSAM every 5 (fsam_optax)": lambda f: method_variant(f, looksam_every_5()),
}


# The schedules of SCHEDULED and FAMILY with the SAM-or-one-pass choice made on
# the host (fsam_optax.is_sam_step), where they make it on the device.
HOST_CHOSEN: dict[str, Callable[[Callable], Variant]] = {
  "F-SAM every 2nd step, host choice": lambda f: fsam_variant(f, host_choice=True, every=2),
  "LookSAM every 5, host choice": lambda f: method_variant(f, looksam_every_5(), True),
}

# Steps per sample that give every sample the same share of SAM steps under
# each of these schedules (every 2nd step, every 5th), wherever it starts.
SCHEDULE_PERIOD = 10


def jit_step(step: Step, donate: bool = True, host_choice: bool = False) -> Step:
  """``step`` under jit; by default donating params and optimizer state, as a training loop would.

  ``host_choice``: the step's keyword ``sam_step`` is static, one program per choice.
  """
  static = ("sam_step",) if host_choice else ()
  return jax.jit(step, donate_argnums=(0, 1) if donate else (), static_argnames=static)


# --------------------------------------------------------------------- timing


class Runner:
  """Carries one variant's params and state from step to step.

  With ``host_choice`` it is the training loop of the host's choice: before
  each step it asks ``fsam_optax.is_sam_step`` whether its own count of
  updates takes the SAM step and passes the answer as ``sam_step``, so that
  the time of a step includes that call and the dispatch of one of two
  compiled programs.
  """

  def __init__(
    self, step: Step, params: Any, opt_state: Any, batch: Batch, host_choice: bool = False
  ):
    self.step, self.params, self.opt_state, self.batch = step, params, opt_state, batch
    self.host_choice = host_choice
    self.count = 0  # the loop's own count of updates, from 0

  @classmethod
  def of(
    cls,
    variant: Variant,
    params: Any,
    batch: Batch,
    donate: bool = True,
    device: jax.Device | None = None,
  ) -> Runner:
    """A runner of ``variant``'s jitted step, from ``params`` and the state it initialises.

    Both are committed to ``device`` (JAX's default device if None), as the
    step's outputs are: a step called on uncommitted arrays beside committed
    ones would compile again on its second call.
    """
    step = jit_step(variant.step, donate, variant.host_choice)
    params = jax.device_put(params, device or jax.devices()[0])
    opt_state = jax.device_put(variant.init(params), device or jax.devices()[0])
    return cls(step, params, opt_state, batch, variant.host_choice)

  def compile(self) -> float:
    """Compiles the programs the steps call (a host choice has two); the seconds it took.

    jit keeps them, so that no timed step compiles.
    """
    choices = [{"sam_step": True}, {"sam_step": False}] if self.host_choice else [{}]
    start = time.perf_counter()
    for kwargs in choices:
      self.step.lower(self.params, self.opt_state, self.batch, **kwargs).compile()
    return time.perf_counter() - start

  def __call__(self, n: int) -> None:
    for _ in range(n):
      if self.host_choice:
        sam_step = fsam_optax.is_sam_step(self.opt_state, self.count)
        out = self.step(self.params, self.opt_state, self.batch, sam_step=sam_step)
      else:
        out = self.step(self.params, self.opt_state, self.batch)
      self.params, self.opt_state, loss = out
      self.count += 1
    jax.block_until_ready((self.params, self.opt_state, loss))


def interleaved(
  runners: dict[Any, Callable[[int], None]],
  rounds: int,
  steps_per_round: int,
  warmup_steps: int = 1,
) -> dict[Any, list[float]]:
  """Seconds per step of each runner, over rounds that visit every runner once.

  The order rotates each round, so that a burst of load from other jobs on
  the machine falls on every variant alike; the first (warm-up) call of each
  runner, of ``warmup_steps`` steps, is not recorded. A host choice needs
  enough of them to dispatch each of its programs once (SCHEDULE_PERIOD does
  for the schedules here).
  """
  names = list(runners)
  for name in names:
    runners[name](warmup_steps)
  times: dict[str, list[float]] = {name: [] for name in names}
  for r in range(rounds):
    for name in names[r % len(names) :] + names[: r % len(names)]:
      start = time.perf_counter()
      runners[name](steps_per_round)
      times[name].append((time.perf_counter() - start) / steps_per_round)
  return times


# -------------------------------------------------------------------- reports


def load_average() -> str:
  one, five, fifteen = os.getloadavg()
  return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _version(package: str) -> str:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return "not installed"


def header(title: str, packages: Sequence[str] = ("jax", "jaxlib", "optax", "fsam_optax")) -> str:
  versions = ", ".join(f"{p} {_version(p)}" for p in packages)
  lines = [
    f"# {title}",
    f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
    f"machine: {cpu_model()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}",
    f"python {platform.python_version()}; {versions}",
    f"jax devices: {', '.join(str(d) for d in jax.devices())}",
    f"load average (1/5/15 min) at start: {load_average()}",
  ]
  return "\n".join(lines)


def table(rows: Sequence[Sequence[str]], headings: Sequence[str]) -> str:
  """A Markdown table (it prints readably and pastes into the docs' results pages)."""
  cells = [list(headings), *[list(r) for r in rows]]
  widths = [max(len(row[i]) for row in cells) for i in range(len(headings))]
  fmt = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
  rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
  return "\n".join([fmt(cells[0]), rule, *[fmt(r) for r in cells[1:]]])


def summary(samples: Sequence[float], scale: float = 1e3) -> tuple[float, str]:
  """The median and a 'min-max' string, in milliseconds by default."""
  med = statistics.median(samples) * scale
  return med, f"{min(samples) * scale:.2f}-{max(samples) * scale:.2f}"
