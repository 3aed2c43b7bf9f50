"""SGD, SAM and the SAM family (F-SAM, GSAM, VaSSO, LookSAM) on Fashion-MNIST with label noise.

Reads the original IDX files (``train-images-idx3-ubyte`` etc., gzipped or
not) from ``--data-dir`` (default ``/usr/share/datasets/fashion-mnist``, where
the Debian/Ubuntu package ``dataset-fashion-mnist`` installs them) and trains
an MLP with the same base optimizer (SGD, momentum, weight decay, cosine
learning rate) under every method of :data:`METHODS`.

Protocol (all choices are made on noisy labels; the clean test set is only
reported):

* A fixed random subset of the 60,000 training images (``--subset``) is split
  90/10 into a training and a validation set.
* Symmetric label noise at rate ``p``: a random fraction ``p`` of the training
  *and* validation labels is replaced by a different class drawn uniformly.
  A seed fixes the noise, the initialisation and the minibatch order, so runs
  with the same seed are paired across methods.
* Tuning, on seed 0 at each noise level: SAM's ``rho`` over a grid; then,
  for each method of the family, its own hyperparameter at SAM's chosen
  ``rho`` (F-SAM's ``lmbda`` with ``sigma`` 1, GSAM's ``alpha``, VaSSO's
  ``theta``, LookSAM's ``alpha`` with ``every`` 5), then its ``rho`` around
  SAM's at that value; the value with the best final-epoch noisy-validation
  accuracy wins. A winner at the edge of its grid adds the next value of its
  ladder in that direction and the choice is made again.
* Reporting, on seeds 1, 2, 3 (unused in tuning): final-epoch test accuracy
  and test accuracy at the best noisy-validation epoch (early stopping), with
  paired differences and 95% t-intervals.

Every finished run appends one row to ``runs.csv`` in ``--out-dir`` (its
settings, seed, per-epoch accuracies and wall times); running the same
command again skips the runs already there, and so does a command that adds
methods or noise levels (other settings are refused). ``config.json`` records
the settings, library versions, git commit and machine of the latest invocation
(and of the earlier ones, under ``earlier_invocations``); ``results.md``,
``timing.md`` and ``fashion_mnist.png`` are rewritten from the CSV after each
noise level (and by ``--report-only``).

Usage::

  python examples/fashion_mnist.py                       # the full study
  python examples/fashion_mnist.py --smoke               # seconds, generated data
  python examples/fashion_mnist.py --report-only         # tables and figure from the CSV
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import gzip
import itertools
import json
import math
import os
import pathlib
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import label_noise  # examples/label_noise.py, beside this script
import numpy as np
import optax
from flax import nnx
from label_noise import Data
from tqdm.auto import tqdm

import fsam_optax

NUM_CLASSES = 10
DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"
DEBIAN_PACKAGE = "dataset-fashion-mnist"
FILES = {
  "train_images": "train-images-idx3-ubyte",
  "train_labels": "train-labels-idx1-ubyte",
  "test_images": "t10k-images-idx3-ubyte",
  "test_labels": "t10k-labels-idx1-ubyte",
}
TUNING_SEED = 0

# ----------------------------------------------------------------------------
# Data: the IDX format and the split.


class DataError(ValueError):
  """A Fashion-MNIST file is missing or is not a valid IDX file."""


def _data_hint(data_dir: pathlib.Path) -> str:
  return (
    f"Point --data-dir at the folder holding the four Fashion-MNIST IDX files "
    f"(now {str(data_dir)!r}), or install them into {DEFAULT_DATA_DIR} with "
    f"`sudo apt-get install {DEBIAN_PACKAGE}` (Debian/Ubuntu)."
  )


def read_idx(path: pathlib.Path) -> np.ndarray:
  """Reads an IDX file of unsigned bytes (gzipped or not) into a uint8 array.

  The format: two zero bytes, the type code ``0x08`` (unsigned byte), the
  number of dimensions ``d``, then ``d`` big-endian uint32 sizes and the data.

  >>> import tempfile, pathlib
  >>> path = pathlib.Path(tempfile.mkdtemp()) / "labels-idx1-ubyte"
  >>> _ = path.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 0, 9]))
  >>> read_idx(path)
  array([7, 0, 9], dtype=uint8)
  """
  raw = path.read_bytes()
  if raw[:2] == b"\x1f\x8b":  # the gzip magic number
    try:
      raw = gzip.decompress(raw)
    except (OSError, EOFError) as e:
      raise DataError(f"{path}: a damaged or truncated gzip file ({e}).") from e
  if len(raw) < 4 or raw[:3] != b"\x00\x00\x08" or raw[3] == 0:
    raise DataError(
      f"{path}: not an IDX file of unsigned bytes (magic number {raw[:4].hex() or 'missing'}, "
      "expected 00000801 for labels or 00000803 for images)."
    )
  ndim = raw[3]
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise DataError(f"{path}: truncated inside the header ({len(raw)} bytes).")
  shape = tuple(int(n) for n in np.frombuffer(raw, ">u4", ndim, offset=4))
  size = math.prod(shape)
  if len(raw) != header + size:
    what = "truncated" if len(raw) < header + size else "longer than its header says"
    raise DataError(
      f"{path}: {what}: the header gives shape {shape}, {header + size} bytes in all, "
      f"the file has {len(raw)}."
    )
  return np.frombuffer(raw, np.uint8, size, offset=header).reshape(shape)


def write_idx(path: pathlib.Path, array: np.ndarray) -> None:
  """Writes a uint8 array as an IDX file, gzipped when ``path`` ends in ``.gz``."""
  array = np.asarray(array, np.uint8)
  raw = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, ">u4").tobytes() + array.tobytes()
  path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


def _find(data_dir: pathlib.Path, name: str) -> pathlib.Path:
  for candidate in (data_dir / f"{name}.gz", data_dir / name):
    if candidate.is_file():
      return candidate
  raise DataError(f"{name}(.gz) not found in {data_dir}. " + _data_hint(data_dir))


def load_fashion_mnist(data_dir: str | os.PathLike) -> dict[str, np.ndarray]:
  """The four arrays: images (N, 28, 28) uint8 and labels (N,) uint8.

  Raises :class:`DataError` (a ``ValueError``) naming ``--data-dir`` and the
  Debian package when a file is missing, malformed or inconsistent.
  """
  data_dir = pathlib.Path(data_dir)
  arrays = {}
  for key, name in FILES.items():
    path = _find(data_dir, name)
    try:
      arrays[key] = read_idx(path)
    except DataError as e:
      raise DataError(f"{e} " + _data_hint(data_dir)) from None
    want = 3 if key.endswith("images") else 1
    if arrays[key].ndim != want:
      raise DataError(
        f"{path}: {arrays[key].ndim} dimensions, expected {want}. " + _data_hint(data_dir)
      )
  for part in ("train", "test"):
    images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
    if len(images) != len(labels) or labels.max(initial=0) >= NUM_CLASSES:
      raise DataError(
        f"{part}: {len(images)} images but {len(labels)} labels (classes up to "
        f"{labels.max(initial=0)}); the files do not belong together. " + _data_hint(data_dir)
      )
  return arrays


def make_split(arrays: dict[str, np.ndarray], subset: int, pool: int, split_seed: int = 0) -> Data:
  """A random ``subset`` of the training images split 90/10 into train and validation.

  ``pool`` > 1 average-pools the images ``pool x pool`` (28x28 to 14x14 for 2).
  """
  n_all = len(arrays["train_labels"])
  if not 10 <= subset <= n_all:
    raise ValueError(f"--subset must be in [10, {n_all}], got {subset}")
  if 28 % pool:
    raise ValueError(f"--pool must divide 28, got {pool}")
  pick = np.random.default_rng(split_seed).permutation(n_all)[:subset]
  n_val = subset // 10

  def images(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32) / 255.0
    side = x.shape[1] // pool
    return x.reshape(len(x), side, pool, side, pool).mean((2, 4)).reshape(len(x), -1)

  x_train = images(arrays["train_images"][pick[n_val:]])
  mean, std = x_train.mean(), x_train.std()
  norm = lambda x: (x - mean) / std
  return Data(
    x_train=norm(x_train),
    y_train=arrays["train_labels"][pick[n_val:]].astype(np.int32),
    x_val=norm(images(arrays["train_images"][pick[:n_val]])),
    y_val=arrays["train_labels"][pick[:n_val]].astype(np.int32),
    x_test=norm(images(arrays["test_images"])),
    y_test=arrays["test_labels"].astype(np.int32),
  )


def noisy_labels(data: Data, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Training and validation labels with the noise of one seed, the same for every method."""
  return label_noise.noisy_labels(data, noise, seed, noise_scale=1000)


# ----------------------------------------------------------------------------
# Methods: one registry entry each.


@dataclasses.dataclass(frozen=True)
class Grid:
  """A hyperparameter tuned on seed 0 over a window of ``ladder``.

  The window starts as ``start``, or, when that is empty, as the inherited
  value (from ``Method.start_from``) and its two neighbours on the ladder.
  """

  name: str
  ladder: tuple[float, ...]
  start: tuple[float, ...] = ()

  def window(self, current: float | None) -> list[float]:
    if self.start:
      return list(self.start)
    if current not in self.ladder:
      raise ValueError(f"{self.name}: the inherited value {current} is not on {self.ladder}")
    i = self.ladder.index(current)
    return list(self.ladder[max(i - 1, 0) : i + 2])


def _plain_value_and_grad(loss_fn: Callable[..., Any]) -> Callable[..., Any]:
  grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
  return lambda model, opt_state, *args: grad_fn(model, *args)


def _sam_value_and_grad(loss_fn: Callable[..., Any]) -> Callable[..., Any]:
  return fsam_optax.sam_value_and_grad(loss_fn, has_aux=True)


@dataclasses.dataclass(frozen=True)
class Method:
  """How one optimizer is built, tuned and compared.

  Attributes:
    label: the name in tables and figures.
    front: builds what goes before the shared base optimizer in the chain
      (``None``: nothing) from the hyperparameters. Values in ``fixed`` arrive
      as Python constants, the others as traced scalars (one compile per method);
      ``learning_rate`` is the base optimizer's schedule.
    value_and_grad: turns ``loss_fn(model, *args) -> (loss, aux)`` into
      ``fn(model, opt_state, *args) -> ((loss, aux), grads)`` for ``tx.update``.
    fixed: hyperparameters that are never tuned.
    tuned: hyperparameters tuned on seed 0, one after the other.
    start_from: a method whose chosen hyperparameters this one starts from.
    compare_to: methods the report gives paired differences against.
  """

  label: str
  front: Callable[[dict[str, Any]], optax.GradientTransformation | None]
  value_and_grad: Callable[[Callable[..., Any]], Callable[..., Any]] = _sam_value_and_grad
  fixed: dict[str, Any] = dataclasses.field(default_factory=dict)
  tuned: tuple[Grid, ...] = ()
  start_from: str | None = None
  compare_to: tuple[str, ...] = ()


RHO = Grid("rho", (0.0125, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6), (0.05, 0.1, 0.2))
LMBDA = Grid("lmbda", (0.0, 0.3, 0.6, 0.9, 0.95, 0.99), (0.6, 0.9, 0.95))
RHO_AROUND = Grid("rho", RHO.ladder)  # around the inherited rho
# GSAM's alpha: the official README uses 0.1-0.4 on CIFAR and 0.6 on ViTs; 0 would be SAM.
GSAM_ALPHA = Grid("alpha", (0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0), (0.1, 0.2, 0.4))
# VaSSO's theta, the new gradient's weight in the moving average; 1 is SAM.
VASSO_THETA = Grid("theta", (0.1, 0.2, 0.4, 0.6, 0.9, 1.0), (0.2, 0.4, 0.9))
# LookSAM's alpha (the paper's default 0.7); 0 is SAM every 5th step with plain steps between.
LOOKSAM_ALPHA = Grid("alpha", (0.0, 0.1, 0.4, 0.7, 1.0), (0.1, 0.4, 0.7))
# WSAM's gamma (0.9, the default of the class at its last commit): the sharpness term weighs
# gamma / (1 - gamma).
WSAM_GAMMA = Grid("gamma", (0.5, 0.7, 0.8, 0.9, 0.95, 0.99), (0.8, 0.9, 0.95))

METHODS: dict[str, Method] = {
  "sgd": Method("SGD", front=lambda hp: None, value_and_grad=_plain_value_and_grad),
  "sam": Method(
    "SAM", front=lambda hp: fsam_optax.sam(hp["rho"]), tuned=(RHO,), compare_to=("sgd",)
  ),
  "fsam": Method(
    "F-SAM",
    front=lambda hp: fsam_optax.fsam(hp["rho"], sigma=hp["sigma"], lmbda=hp["lmbda"]),
    fixed={"sigma": 1.0},
    tuned=(LMBDA, RHO_AROUND),  # lmbda at SAM's rho, then rho at that lmbda
    start_from="sam",
    compare_to=("sam", "sgd"),
  ),
  # The cheaper schedule: F-SAM's chosen values, the SAM step on every 2nd step only.
  "fsam_every2": Method(
    "F-SAM every 2",
    front=lambda hp: fsam_optax.fsam(hp["rho"], sigma=hp["sigma"], lmbda=hp["lmbda"], every=2),
    start_from="fsam",
    compare_to=("fsam",),
  ),
  # GSAM with a constant rho, as SAM here (the paper lets rho follow the learning rate:
  # fsam_optax.gsam_rho_schedule); alpha at SAM's rho, then rho at that alpha.
  "gsam": Method(
    "GSAM",
    front=lambda hp: fsam_optax.gsam(hp["rho"], hp["alpha"]),
    tuned=(GSAM_ALPHA, RHO_AROUND),
    start_from="sam",
    compare_to=("sam", "sgd"),
  ),
  # VaSSO with its official eps 1e-7 (the library's default); theta, then rho.
  "vasso": Method(
    "VaSSO",
    front=lambda hp: fsam_optax.vasso(hp["rho"], hp["theta"]),
    tuned=(VASSO_THETA, RHO_AROUND),
    start_from="sam",
    compare_to=("sam", "sgd"),
  ),
  # LookSAM with k = 5 (static, so fixed: a Python int); alpha, then rho.
  "looksam": Method(
    "LookSAM",
    front=lambda hp: fsam_optax.looksam(hp["rho"], every=hp["every"], alpha=hp["alpha"]),
    fixed={"every": 5},
    tuned=(LOOKSAM_ALPHA, RHO_AROUND),
    start_from="sam",
    compare_to=("sam", "sgd"),
  ),
  # WSAM in its decoupled form (the class's default): the sharpness term after the base
  # step, with the base's learning rate; gamma, then rho.
  "wsam": Method(
    "WSAM",
    front=lambda hp: fsam_optax.wsam(hp["rho"], hp["gamma"], learning_rate=hp["learning_rate"]),
    tuned=(WSAM_GAMMA, RHO_AROUND),
    start_from="sam",
    compare_to=("sam", "sgd"),
  ),
}
# What a plain `python examples/fashion_mnist.py` runs.
STUDY_METHODS = ("sgd", "sam", "fsam", "gsam", "vasso", "looksam", "wsam")

# ----------------------------------------------------------------------------
# Model and training.


class Net(nnx.Module):
  """Optional 3x3 convolutions (ReLU, 2x2 average pooling), then ReLU layers and a linear head.

  With no convolutions it is an MLP on the flattened pixels.
  """

  def __init__(self, side: int, conv: Sequence[int], hidden: Sequence[int], *, rngs: nnx.Rngs):
    self.side = side
    channels = (1, *conv)
    self.convs = nnx.List(
      [nnx.Conv(a, b, (3, 3), rngs=rngs) for a, b in itertools.pairwise(channels)]
    )
    sizes = ((side >> len(conv)) ** 2 * channels[-1], *hidden)
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in itertools.pairwise(sizes)])
    self.head = nnx.Linear(sizes[-1], NUM_CLASSES, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    if len(self.convs):
      x = x.reshape(len(x), self.side, self.side, 1)
      for conv in self.convs:
        x = nnx.avg_pool(nnx.relu(conv(x)), (2, 2), strides=(2, 2))
      x = x.reshape(len(x), -1)
    for layer in self.layers:
      x = nnx.relu(layer(x))
    return self.head(x)


@dataclasses.dataclass(frozen=True)
class Settings:
  """What every run shares; recorded in config.json, checked on resume."""

  subset: int = 20_000
  pool: int = 2
  conv: tuple[int, ...] = ()  # channels of the 3x3 convolutions; none: an MLP
  hidden: tuple[int, ...] = (512, 512)
  epochs: int = 50
  batch_size: int = 128
  lr: float = 0.05
  momentum: float = 0.9
  weight_decay: float = 5e-4


class Trainer:
  """Compiled init, epoch and accuracy functions of one method."""

  def __init__(self, method: str, settings: Settings, data: Data):
    self.method, self.settings, self.data = METHODS[method], settings, data
    self.steps_per_epoch = len(data.y_train) // settings.batch_size
    if self.steps_per_epoch == 0:
      raise ValueError(
        f"--batch-size {settings.batch_size} exceeds the {len(data.y_train)} training images"
      )
    self.side = 28 // settings.pool
    if self.side % 2 ** len(settings.conv):
      raise ValueError(
        f"--conv: {len(settings.conv)} poolings do not divide the {self.side}-pixel side"
      )
    build = lambda: Net(self.side, settings.conv, settings.hidden, rngs=nnx.Rngs(0))
    self.graphdef = nnx.graphdef(nnx.eval_shape(build))
    self.init = jax.jit(self._init)
    self.epoch = jax.jit(self._epoch, donate_argnums=0)
    self.accuracy = jax.jit(self._accuracy)

  def _tx(self, hp: dict[str, Any]) -> optax.GradientTransformation:
    s = self.settings
    schedule = optax.cosine_decay_schedule(s.lr, self.steps_per_epoch * s.epochs)
    base = optax.chain(
      optax.add_decayed_weights(s.weight_decay), optax.sgd(schedule, momentum=s.momentum)
    )
    front = self.method.front({**hp, **self.method.fixed, "learning_rate": schedule})
    return base if front is None else fsam_optax.chain(front, base)

  def _init(self, key: jax.Array, hp: dict[str, jax.Array]) -> tuple[Any, Any]:
    model = Net(self.side, self.settings.conv, self.settings.hidden, rngs=nnx.Rngs(key))
    params = nnx.state(model, nnx.Param)
    return params, self._tx(hp).init(params)

  def _loss(self, model: Net, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    logits = model(x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, jnp.sum(jnp.argmax(logits, -1) == y)

  def _epoch(self, state: Any, hp: dict[str, jax.Array], x: jax.Array, y: jax.Array, key):
    """One shuffled pass; returns the state, the mean loss and the running accuracy.

    The running accuracy counts the minibatches' correct predictions (clean
    pass, before each step) against the noisy labels they are trained on: the
    usual training accuracy, free of an extra pass over the training set.
    """
    tx = self._tx(hp)
    grad_fn = self.method.value_and_grad(self._loss)

    def step(carry, idx):
      params, opt_state = carry
      model = nnx.merge(self.graphdef, params)
      (loss, correct), grads = grad_fn(model, opt_state, x[idx], y[idx])
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), (loss, correct)

    n = self.steps_per_epoch * self.settings.batch_size
    order = jax.random.permutation(key, len(y))[:n].reshape(self.steps_per_epoch, -1)
    state, (losses, correct) = jax.lax.scan(step, state, order)
    return state, losses.mean(), correct.sum() / n

  def _accuracy(self, params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean(jnp.argmax(nnx.merge(self.graphdef, params)(x), -1) == y)

  def run(
    self, noise: float, seed: int, hp: dict[str, float], on_epoch: Callable[[], None]
  ) -> dict[str, Any]:
    """Trains one run; returns its per-epoch curves and wall times."""
    y_train, y_val = noisy_labels(self.data, noise, seed)
    x_train, y_train = jnp.asarray(self.data.x_train), jnp.asarray(y_train)
    # On the device once, not at every epoch's evaluation.
    x_val, y_val = jnp.asarray(self.data.x_val), jnp.asarray(y_val)
    x_test, y_test = jnp.asarray(self.data.x_test), jnp.asarray(self.data.y_test)
    traced = {k: jnp.float32(v) for k, v in hp.items() if k not in self.method.fixed}
    key = jax.random.key(seed)
    state = self.init(key, traced)
    curves: dict[str, list[float]] = {
      k: [] for k in ("loss", "train_acc", "val_acc", "test_acc", "train_s", "eval_s")
    }
    for epoch in range(self.settings.epochs):
      start = time.perf_counter()
      state, loss, train_acc = jax.block_until_ready(
        self.epoch(state, traced, x_train, y_train, jax.random.fold_in(key, epoch))
      )
      middle = time.perf_counter()
      # Validation is scored against the noisy labels, all a user would have.
      val = float(self.accuracy(state[0], x_val, y_val))
      test = float(self.accuracy(state[0], x_test, y_test))
      for name, value in zip(
        curves,
        (float(loss), float(train_acc), val, test, middle - start, time.perf_counter() - middle),
        strict=True,
      ):
        curves[name].append(value)
      on_epoch()
    return curves


# ----------------------------------------------------------------------------
# The study: a resumable CSV of runs, tuning and reporting.

CSV_FIELDS = (
  "stage",
  "method",
  "noise",
  "seed",
  "hparams",
  "final_val_acc",
  "final_test_acc",
  "best_val_epoch",
  "early_stop_test_acc",
  "train_seconds",
  "eval_seconds",
  "loss",
  "train_acc",
  "val_acc",
  "test_acc",
  "train_s",
  "eval_s",
)


def _rounded(value: Any) -> Any:
  """Accuracies and seconds to 5 significant digits, which keeps the CSV small."""
  if isinstance(value, list):
    return [float(f"{v:.5g}") for v in value]
  return value


def _key(method: str, noise: float, seed: int, hp: dict[str, float]) -> tuple:
  return (method, round(float(noise), 6), int(seed), json.dumps(hp, sort_keys=True))


def read_runs(path: pathlib.Path) -> list[dict[str, Any]]:
  """The finished runs of a CSV, with numbers and per-epoch lists decoded."""
  if not path.exists():
    return []
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  for row in rows:
    row["noise"], row["seed"] = float(row["noise"]), int(row["seed"])
    for name in ("hparams", "loss", "train_acc", "val_acc", "test_acc", "train_s", "eval_s"):
      row[name] = json.loads(row[name])
    for name in ("final_val_acc", "final_test_acc", "early_stop_test_acc"):
      row[name] = float(row[name])
    for name in ("train_seconds", "eval_seconds"):
      row[name] = float(row[name])
    row["best_val_epoch"] = int(row["best_val_epoch"])
  return rows


class Study:
  """Runs (or finds in the CSV) every run the protocol needs."""

  def __init__(self, settings: Settings, data: Data, out: pathlib.Path, bar: tqdm):
    self.settings, self.data, self.out, self.bar = settings, data, out, bar
    self.csv = out / "runs.csv"
    self.done = {
      _key(r["method"], r["noise"], r["seed"], r["hparams"]): r for r in read_runs(self.csv)
    }
    self.trainers: dict[str, Trainer] = {}

  def get(self, stage: str, method: str, noise: float, seed: int, hp: dict[str, float]):
    """The run's CSV row, training it first unless an earlier invocation did."""
    key = _key(method, noise, seed, hp)
    if key in self.done:
      return self.done[key]
    if method not in self.trainers:
      self.trainers[method] = Trainer(method, self.settings, self.data)
    self.bar.set_postfix_str(f"{method} noise={noise:g} seed={seed} {hp}")
    curves = self.trainers[method].run(noise, seed, hp, lambda: self.bar.update())
    best = int(np.argmax(curves["val_acc"]))  # the first best epoch on ties
    row = {
      "stage": stage,
      "method": method,
      "noise": noise,
      "seed": seed,
      "hparams": hp,
      "final_val_acc": curves["val_acc"][-1],
      "final_test_acc": curves["test_acc"][-1],
      "best_val_epoch": best + 1,
      "early_stop_test_acc": curves["test_acc"][best],
      "train_seconds": sum(curves["train_s"]),
      "eval_seconds": sum(curves["eval_s"]),
      **curves,
    }
    new = not self.csv.exists()
    with open(self.csv, "a", newline="") as f:
      writer = csv.DictWriter(f, CSV_FIELDS)
      if new:
        writer.writeheader()
      encoded = {
        k: json.dumps(_rounded(v)) if isinstance(v, dict | list) else v for k, v in row.items()
      }
      writer.writerow(encoded)
    self.done[key] = row
    return row

  def choose(self, method: str, noise: float) -> dict[str, float]:
    """Tunes ``method`` on seed 0 at ``noise``; returns its chosen hyperparameters."""
    m = METHODS[method]
    hp = dict(self.choose(m.start_from, noise)) if m.start_from else {}
    hp.update(m.fixed)
    for grid in m.tuned:
      values = grid.window(hp.get(grid.name))
      while True:
        scores = [
          self.get("tune", method, noise, TUNING_SEED, {**hp, grid.name: v})["final_val_acc"]
          for v in values
        ]
        best = values[int(np.argmax(scores))]  # the first (smallest) on ties
        i = grid.ladder.index(best)
        if best == values[0] and i > 0:
          values.insert(0, grid.ladder[i - 1])
        elif best == values[-1] and i + 1 < len(grid.ladder):
          values.append(grid.ladder[i + 1])
        else:
          break
        self.bar.total += self.settings.epochs
      hp[grid.name] = best
    if not m.tuned and not m.start_from:
      self.get("tune", method, noise, TUNING_SEED, hp)  # its seed-0 run, for the record
    return hp

  def report_runs(self, method: str, noise: float, seeds: Sequence[int]) -> None:
    hp = self.choose(method, noise)
    for seed in seeds:
      self.get("report", method, noise, seed, hp)


def planned_epochs(methods: Sequence[str], noises: Sequence[float], seeds: int, epochs: int) -> int:
  """Epochs of the study before any grid is widened (for the progress bar)."""
  runs = 0
  for method in methods:
    m = METHODS[method]
    runs += sum(len(g.start) or 2 for g in m.tuned) + (0 if m.tuned or m.start_from else 1) + seeds
  return runs * len(noises) * epochs


# ----------------------------------------------------------------------------
# Report: statistics, table and figure from the CSV.

T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def t_interval(diffs: Sequence[float]) -> tuple[float, float]:
  """Mean and half-width of the 95% t-interval of paired differences.

  >>> mean, half = t_interval([1.0, 2.0, 3.0])
  >>> print(f"{mean:.2f} ± {half:.2f}")
  2.00 ± 2.48
  """
  d = np.asarray(diffs, float)
  if len(d) < 2:
    return float(d.mean()), math.nan
  if len(d) - 1 not in T_975:
    raise ValueError(f"t_interval: {len(d)} pairs; the table covers 2 to {max(T_975) + 1}")
  return float(d.mean()), T_975[len(d) - 1] * float(d.std(ddof=1)) / math.sqrt(len(d))


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """Per (noise, method): the report rows (seeds >= 1) by seed, and the chosen hyperparameters."""
  out: dict[float, dict[str, dict[int, dict[str, Any]]]] = {}
  for r in rows:
    if r["stage"] == "report":
      out.setdefault(r["noise"], {}).setdefault(r["method"], {})[r["seed"]] = r
  return dict(sorted(out.items()))


def _fmt_hp(hp: dict[str, float]) -> str:
  return ", ".join(f"{k} {v:g}" for k, v in hp.items())


def markdown_report(rows: Sequence[dict[str, Any]]) -> str:
  """The results tables (accuracies in %) of the reporting seeds."""
  table = summarize(rows)
  metrics = {"final_test_acc": "final epoch", "early_stop_test_acc": "best noisy-val epoch"}
  methods = list(dict.fromkeys(m for by in table.values() for m in by))
  lines = []
  for metric, title in metrics.items():
    lines += [
      f"**Clean test accuracy (%), {title}**, mean ± std over the reporting seeds",
      "",
      "| label noise | " + " | ".join(METHODS[m].label for m in methods) + " |",
      "|---" * (len(methods) + 1) + "|",
    ]
    for noise, by in table.items():
      cells = []
      for m in methods:
        acc = [100 * r[metric] for r in by.get(m, {}).values()]
        cells.append(
          f"{np.mean(acc):.2f} ± {np.std(acc, ddof=1) if len(acc) > 1 else math.nan:.2f}"
          if acc
          else "n/a"
        )
      lines.append(f"| {noise:.0%} | " + " | ".join(cells) + " |")
    lines += ["", f"**Paired differences (points), {title}**: mean [95% t-interval] (per seed)", ""]
    lines += ["| label noise | comparison | difference | per seed |", "|---|---|---|---|"]
    for noise, by in table.items():
      for m in by:
        for other in METHODS[m].compare_to:
          seeds = sorted(set(by[m]) & set(by.get(other, {})))
          if not seeds:
            continue
          d = [100 * (by[m][s][metric] - by[other][s][metric]) for s in seeds]
          mean, half = t_interval(d)
          per_seed = ", ".join(f"{x:+.2f}" for x in d)
          lines.append(
            f"| {noise:.0%} | {METHODS[m].label} - {METHODS[other].label} | "
            f"{mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}] | {per_seed} |"
          )
    lines.append("")
  lines += [
    "**Has SGD fitted the noise?** Clean test accuracy (%) of SGD, mean over the reporting "
    "seeds: its best epoch (picked with the test set, for this check only) and its final epoch",
    "",
    "| label noise | best epoch | final epoch | drop |",
    "|---|---|---|---|",
  ]
  for noise, by in table.items():
    if "sgd" in by:
      best = np.mean([100 * max(r["test_acc"]) for r in by["sgd"].values()])
      final = np.mean([100 * r["final_test_acc"] for r in by["sgd"].values()])
      lines.append(f"| {noise:.0%} | {best:.2f} | {final:.2f} | {best - final:.2f} |")
  lines += ["", "**Chosen hyperparameters** (seed 0, final noisy-validation accuracy)", ""]
  lines += ["| label noise | " + " | ".join(METHODS[m].label for m in methods) + " |"]
  lines.append("|---" * (len(methods) + 1) + "|")
  for noise, by in table.items():
    cells = [_fmt_hp(next(iter(by[m].values()))["hparams"]) if m in by else "n/a" for m in methods]
    lines.append(f"| {noise:.0%} | " + " | ".join(c or "n/a" for c in cells) + " |")
  return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict[str, Any]], path: pathlib.Path) -> None:
  """Test accuracy vs noise rate per method, mean ± std over the reporting seeds."""
  import matplotlib

  matplotlib.use("Agg")  # Writes files; needs no display.
  import matplotlib.pyplot as plt

  table = summarize(rows)
  methods = list(dict.fromkeys(m for by in table.values() for m in by))
  metrics = {"final_test_acc": "final epoch", "early_stop_test_acc": "best noisy-val epoch"}
  fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
  for ax, (metric, title) in zip(axes, metrics.items(), strict=True):
    for k, m in enumerate(methods):
      noises = [n for n, by in table.items() if m in by]
      acc = [[100 * r[metric] for r in table[n][m].values()] for n in noises]
      # Small horizontal offsets keep the error bars apart.
      x = 100 * np.asarray(noises) + (k - (len(methods) - 1) / 2) * 0.8
      std = [np.std(a, ddof=1) if len(a) > 1 else 0.0 for a in acc]
      ax.errorbar(
        x, [np.mean(a) for a in acc], yerr=std, marker="o", capsize=3, label=METHODS[m].label
      )
    ax.set(title=f"clean test accuracy, {title}", xlabel="label noise (%)")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("test accuracy (%), mean ± std over seeds")
  axes[0].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def timing_report(rows: Sequence[dict[str, Any]]) -> str:
  """Training seconds per epoch of each method, from the runs' own wall times.

  Per run the median over epochs 2 onward (epoch 1 includes compilation),
  then the median over all the method's runs (tuning and reporting, every
  noise level), and its ratio to SAM's.
  """
  per_run: dict[str, list[float]] = {}
  for r in rows:
    epochs = r["train_s"][1:] or r["train_s"]
    per_run.setdefault(r["method"], []).append(float(np.median(epochs)))
  sam = float(np.median(per_run["sam"])) if "sam" in per_run else math.nan
  lines = [
    "**Training time per epoch** (s): per run the median over epochs 2 onward (epoch 1 "
    "includes compilation), then the median and range over the method's runs (tuning and "
    "reporting, every noise level); evaluation excluded",
    "",
    "| method | runs | s / epoch, median | range over runs | ratio to SAM |",
    "|---|---|---|---|---|",
  ]
  for method, times in per_run.items():
    label = METHODS[method].label if method in METHODS else method
    median = float(np.median(times))
    lines.append(
      f"| {label} | {len(times)} | {median:.3f} | {min(times):.3f} - {max(times):.3f} | "
      f"{median / sam:.2f} |"
    )
  return "\n".join(lines) + "\n"


def write_report(out: pathlib.Path) -> str:
  """Rewrites results.md and fashion_mnist.png from runs.csv; returns the tables."""
  rows = read_runs(out / "runs.csv")
  text = markdown_report(rows)
  config = json.loads((out / "config.json").read_text()) if (out / "config.json").exists() else {}
  s = config.get("settings", {})
  train_s = sum(r["train_seconds"] for r in rows)
  eval_s = sum(r["eval_seconds"] for r in rows)
  header = (
    f"# Fashion-MNIST with label noise\n\n{len(rows)} runs in `runs.csv`; settings {s}. "
    f"Training {train_s / 60:.1f} min, evaluation {eval_s / 60:.1f} min in all.\n\n"
  )
  (out / "results.md").write_text(header + text)
  (out / "timing.md").write_text(
    "# Fashion-MNIST with label noise: training time\n\n"
    "From the wall times in `runs.csv`, on whatever load the machine had when each run "
    "ran; controlled step-time ratios come from `benchmarks/step_time.py`.\n\n"
    + timing_report(rows)
  )
  if any(r["stage"] == "report" for r in rows):
    plot(rows, out / "fashion_mnist.png")
  return text


# ----------------------------------------------------------------------------
# Command line.


def _cpu_model() -> str:
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
  """Library versions, git commit and machine, for config.json."""
  import flax

  try:
    commit = subprocess.run(
      ["git", "rev-parse", "HEAD"],
      capture_output=True,
      text=True,
      check=True,
      cwd=pathlib.Path(__file__).parent,
    ).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    commit = "unknown"
  return {
    "python": sys.version.split()[0],
    "jax": jax.__version__,
    "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else "",
    "optax": optax.__version__,
    "flax": flax.__version__,
    "numpy": np.__version__,
    "fsam_optax": getattr(fsam_optax, "__version__", ""),
    "git_commit": commit,
    "machine": platform.platform(),
    "cpu": _cpu_model(),
    "cpu_count": os.cpu_count(),
    "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    "devices": [str(d) for d in jax.devices()],
  }


INVOCATION_KEYS = ("environment", "command", "methods", "noise", "seeds")


def earlier_invocations(recorded: dict[str, Any] | None, invocation: dict[str, Any]) -> list[Any]:
  """The invocations before this one that config.json records, the last one recorded included.

  The last one is dropped when this invocation repeats it (the same command, versions, commit
  and machine; the load average is left out of the comparison).

  >>> env = {"git_commit": "a", "load_average_at_start": [1.0]}
  >>> old = {"settings": {}, "environment": env, "command": "x"}
  >>> new = {"environment": {**env, "load_average_at_start": [5.0]}, "command": "x"}
  >>> earlier_invocations(old, new)
  []
  >>> [s["command"] for s in earlier_invocations(old, {**new, "command": "y"})]
  ['x']
  """
  if recorded is None:
    return []
  earlier = list(recorded.get("earlier_invocations", []))
  last = {k: recorded[k] for k in INVOCATION_KEYS if k in recorded}

  def identity(s: dict[str, Any]) -> str:
    env = {k: v for k, v in s.get("environment", {}).items() if k != "load_average_at_start"}
    return json.dumps({**s, "environment": env}, sort_keys=True)

  if last and identity(last) != identity(invocation):
    earlier.append(last)
  return earlier


def smoke_data(folder: pathlib.Path, n_train: int = 600, n_test: int = 200) -> pathlib.Path:
  """Writes small generated IDX files (one bright stripe per class) into ``folder``."""
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  for part, n in (("train", n_train), ("t10k", n_test)):
    labels = rng.integers(0, NUM_CLASSES, n).astype(np.uint8)
    images = rng.integers(0, 100, (n, 28, 28)).astype(np.uint8)
    for i, c in enumerate(labels):
      images[i, 2 * c + 4 : 2 * c + 6] = 255
    write_idx(folder / f"{part}-images-idx3-ubyte.gz", images)
    write_idx(folder / f"{part}-labels-idx1-ubyte.gz", labels)
  return folder


SETTINGS_HELP = {
  "subset": "training images used, a fixed random subset of the 60,000, split 90/10 into "
  "train and validation",
  "pool": "average-pool the 28x28 images by this factor; 2 gives 14x14",
  "conv": "channels of the 3x3 convolutions, each followed by ReLU and 2x2 average pooling, "
  "before the dense layers; none: an MLP",
  "hidden": "widths of the dense ReLU layers before the linear head",
  "epochs": "training epochs of every run; final-epoch accuracy is reported",
  "batch_size": "minibatch size",
  "lr": "peak learning rate of the cosine schedule",
  "momentum": "momentum of the SGD base optimizer",
  "weight_decay": "weight decay of the base optimizer",
}
SMOKE_DEFAULTS = dict(
  subset=300,
  hidden=[16],
  epochs=2,
  batch_size=32,
  noise=[0.0, 0.4],
  seeds=2,
  out_dir="runs/fashion_mnist_smoke",
)


def make_parser() -> argparse.ArgumentParser:
  """The command line: the study's flags and one flag per field of :class:`Settings`."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  defaults = Settings()
  shown = lambda value: " ".join(map(str, value)) if isinstance(value, list | tuple) else value
  parser.add_argument(
    "--data-dir",
    default=None,
    help=f"folder of the IDX files, gzipped or not (default {DEFAULT_DATA_DIR})",
  )
  parser.add_argument(
    "--out-dir",
    default="results/fashion_mnist",
    help="folder of runs.csv, config.json, the tables and the figure; a folder that holds runs "
    "is resumed (default results/fashion_mnist)",
  )
  parser.add_argument(
    "--methods",
    nargs="+",
    default=list(STUDY_METHODS),
    choices=list(METHODS),
    help=f"methods to run (default {shown(STUDY_METHODS)})",
  )
  parser.add_argument(
    "--noise",
    nargs="+",
    type=float,
    default=[0.4, 0.2, 0.6, 0.0],
    help="rates (fractions) of symmetric label noise on the train and validation labels, "
    "run in this order (default 0.4 0.2 0.6 0.0)",
  )
  parser.add_argument(
    "--seeds", type=int, default=3, help="reporting seeds 1..N; seed 0 tunes (default 3)"
  )
  for field in dataclasses.fields(Settings):
    flag = "--" + field.name.replace("_", "-")
    value = getattr(defaults, field.name)
    help_text = f"{SETTINGS_HELP[field.name]} (default {shown(value) or 'none'})"
    if isinstance(value, tuple):
      parser.add_argument(flag, type=int, nargs="*", default=list(value), help=help_text)
    else:
      parser.add_argument(flag, type=type(value), default=value, help=help_text)
  smoke = ", ".join(f"--{k.replace('_', '-')} {shown(v)}" for k, v in SMOKE_DEFAULTS.items())
  parser.add_argument(
    "--smoke",
    action="store_true",
    help=f"tiny settings on generated data ({smoke}); flags given explicitly still win",
  )
  parser.add_argument(
    "--report-only",
    action="store_true",
    help="rewrite the tables and figure from runs.csv in --out-dir, training nothing",
  )
  return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = make_parser()
  if "--smoke" in (sys.argv[1:] if argv is None else argv):
    # Smoke defaults: explicit flags still win.
    parser.set_defaults(**SMOKE_DEFAULTS)
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> str:
  args = parse_args(argv)
  out = pathlib.Path(args.out_dir)
  if args.report_only:
    text = write_report(out)
    print(text)
    return text
  settings = Settings(
    **{
      f.name: tuple(getattr(args, f.name)) if f.type.startswith("tuple") else getattr(args, f.name)
      for f in dataclasses.fields(Settings)
    }
  )
  for noise in args.noise:
    if not 0 <= noise < 1 - 1 / NUM_CLASSES + 1e-9:
      raise ValueError(f"--noise must be in [0, 0.9], got {noise}")
  if not 1 <= args.seeds <= max(T_975) + 1:
    raise ValueError(f"--seeds must be in [1, {max(T_975) + 1}] (the t table), got {args.seeds}")
  data_dir = args.data_dir
  if data_dir is None:
    data_dir = smoke_data(out / "smoke_data") if args.smoke else DEFAULT_DATA_DIR
  data = make_split(load_fashion_mnist(data_dir), settings.subset, settings.pool)
  out.mkdir(parents=True, exist_ok=True)
  config_path = out / "config.json"
  recorded = json.loads(config_path.read_text()) if config_path.exists() else None
  settings_dict = json.loads(json.dumps(dataclasses.asdict(settings)))
  if recorded is not None and recorded["settings"] != settings_dict:
    raise ValueError(
      f"{out} holds runs with settings {recorded['settings']}, not {settings_dict}: "
      "resume with the same settings or pass another --out-dir."
    )
  # Adding methods, noise levels or seeds to a folder is a new invocation of the same study.
  invocation = {
    "environment": environment(),
    "command": " ".join(sys.argv),
    "methods": list(args.methods),
    "noise": list(args.noise),
    "seeds": args.seeds,
  }
  config = {
    "settings": settings_dict,
    "data_dir": str(data_dir),
    "split": {"train": len(data.y_train), "val": len(data.y_val), "test": len(data.y_test)},
    **invocation,
    "earlier_invocations": earlier_invocations(recorded, invocation),
  }
  config_path.write_text(json.dumps(config, indent=2) + "\n")
  print(
    f"Fashion-MNIST from {data_dir}: {len(data.y_train)} train / {len(data.y_val)} val / "
    f"{len(data.y_test)} test; {jax.device_count()} {jax.default_backend()} device(s)"
  )
  seeds = range(1, args.seeds + 1)
  total = planned_epochs(args.methods, args.noise, args.seeds, settings.epochs)
  with tqdm(total=total, unit="epoch", desc="study") as bar:
    study = Study(settings, data, out, bar)
    # Finished runs of this plan count as done (from an earlier invocation).
    wanted = lambda r: r["noise"] in args.noise and r["method"] in args.methods
    bar.update(sum(len(r["test_acc"]) for r in study.done.values() if wanted(r)))
    for noise in args.noise:
      for method in args.methods:
        study.report_runs(method, noise, seeds)
      write_report(out)
  text = write_report(out)
  print(text)
  return text


if __name__ == "__main__":
  main()
