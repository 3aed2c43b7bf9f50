"""F-SAM vs SAM vs SGD on scikit-learn's digits, with symmetric label noise.

The main job of the repository. A small Flax NNX CNN is trained on the 8x8
digits bundled with scikit-learn (offline, real data) with three optimizers
that share the base optimizer (SGD with momentum and weight decay), the cosine
learning-rate schedule and the number of epochs:

* ``sgd``: the base optimizer alone;
* ``sam``: ``fsam_optax.sam(rho)`` in front of it;
* ``fsam``: ``fsam_optax.fsam(rho, sigma, lmbda)`` in front of it.

Protocol:

* The data is split once (fixed seed) into train (64%), validation (16%) and
  test (20%), stratified by class.
* Symmetric label noise at rate ``p`` replaces the label of a random fraction
  ``p`` of the train *and* validation examples by a different class drawn
  uniformly (so exactly that fraction is wrong), as a user with noisy data
  would have. The test labels stay clean. Each seed draws its own noise, its
  own initialisation and its own minibatch order.
* ``rho`` is tuned per method and noise level over ``--rho-grid``: the value
  with the highest mean final validation accuracy over the seeds is chosen.
  The test set plays no part in the choice. The table reports the final-epoch
  test accuracy (mean +- std over seeds) of the chosen ``rho``.

Speed: one epoch is a single compiled call (``jax.lax.scan`` over the
minibatches), and ``rho`` is a traced argument, so each method compiles once.
The runs go one after another: on a CPU, ``jax.vmap`` over them was measured
slower per run than running them in turn.

Usage::

  python examples/digits.py            # the full job (a few minutes on 2 CPU cores)
  python examples/digits.py --quick    # a smoke run (under a minute; its numbers mean nothing)

Outputs go to ``--out-dir``: by default ``runs/digits`` of the repository (the
script's parent folder), wherever it is run from, and ``runs/digits-quick`` for
``--quick``, so a smoke run never overwrites the main run's results. They are
``results.csv`` (every method, noise level and rho), ``results.md`` (the table and its
caption), ``curves.png`` (test accuracy per epoch of the chosen runs) and ``config.json``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import pathlib
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
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm.auto import tqdm

import fsam_optax

METHODS = ("sgd", "sam", "fsam")
RUNS = pathlib.Path(__file__).resolve().parents[1] / "runs"
NUM_CLASSES = 10


@dataclasses.dataclass(frozen=True)
class Config:
  """Settings of one experiment; the defaults are the documented main job."""

  epochs: int = 20
  batch_size: int = 32
  lr: float = 0.05
  momentum: float = 0.9
  weight_decay: float = 5e-4
  width: int = 16
  seeds: int = 5
  noise: tuple[float, ...] = (0.0, 0.2, 0.4)
  rho_grid: tuple[float, ...] = (0.05, 0.1, 0.2)
  sigma: float = 1.0
  lmbda: float = 0.6
  methods: tuple[str, ...] = METHODS
  out_dir: str = str(RUNS / "digits")
  # Set by --quick: the screen, results.md and config.json then say it was a smoke run.
  smoke: bool = False

  @classmethod
  def quick(cls, **overrides: Any) -> Config:
    """A smoke-test configuration that runs in well under a minute."""
    settings = dict(
      epochs=3,
      seeds=2,
      noise=(0.0, 0.4),
      rho_grid=(0.05, 0.1),
      out_dir=str(RUNS / "digits-quick"),
      smoke=True,
    )
    return cls(**{**settings, **overrides})


def load_data(split_seed: int = 0) -> Data:
  """Loads digits and splits it 64/16/20 into train/validation/test."""
  digits = load_digits()
  x = (digits.images / 16.0).astype(np.float32)[..., None]
  y = digits.target.astype(np.int32)
  x_rest, x_test, y_rest, y_test = train_test_split(
    x, y, test_size=0.2, stratify=y, random_state=split_seed
  )
  x_train, x_val, y_train, y_val = train_test_split(
    x_rest, y_rest, test_size=0.2, stratify=y_rest, random_state=split_seed
  )
  return Data(x_train, y_train, x_val, y_val, x_test, y_test)


class PatchConv(nnx.Module):
  """A 3x3 'SAME' convolution written as a matmul over image patches.

  Why not ``nnx.Conv``: on CPU, XLA runs convolutions inside a loop (here the
  scan over minibatches) tens of times slower than outside one, while a
  matmul stays fast. The initialisation matches ``nnx.Conv``'s (same fan-in).
  """

  def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs):
    self.kernel = nnx.Linear(9 * in_features, out_features, use_bias=False, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    height, width = x.shape[1:3]
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    shifts = [padded[:, i : i + height, j : j + width] for i in range(3) for j in range(3)]
    return self.kernel(jnp.concatenate(shifts, axis=-1))


class CNN(nnx.Module):
  """Two 3x3 conv-BN-ReLU layers, 2x2 average pooling and a linear head."""

  def __init__(self, width: int, *, rngs: nnx.Rngs):
    self.conv1 = PatchConv(1, width, rngs=rngs)
    self.bn1 = nnx.BatchNorm(width, rngs=rngs)
    self.conv2 = PatchConv(width, 2 * width, rngs=rngs)
    self.bn2 = nnx.BatchNorm(2 * width, rngs=rngs)
    self.head = nnx.Linear(2 * width * 16, NUM_CLASSES, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = nnx.relu(self.bn1(self.conv1(x), use_running_average=not train))
    x = nnx.relu(self.bn2(self.conv2(x), use_running_average=not train))
    x = nnx.avg_pool(x, (2, 2), strides=(2, 2))
    return self.head(x.reshape(x.shape[0], -1))


def make_optimizer(
  method: str, rho: jax.Array, cfg: Config, total_steps: int
) -> optax.GradientTransformation:
  """The shared base optimizer, with SAM or F-SAM in front of it."""
  base = optax.chain(
    optax.add_decayed_weights(cfg.weight_decay),
    optax.sgd(optax.cosine_decay_schedule(cfg.lr, total_steps), momentum=cfg.momentum),
  )
  if method == "sgd":
    return base
  if method == "sam":
    return optax.chain(fsam_optax.sam(rho), base)
  if method == "fsam":
    return optax.chain(fsam_optax.fsam(rho, sigma=cfg.sigma, lmbda=cfg.lmbda), base)
  raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


class Trainer:
  """Compiled init, epoch and accuracy functions for one method.

  ``rho`` is an argument rather than a constant, so the whole grid of one
  method shares one compilation.
  """

  def __init__(self, method: str, cfg: Config, data: Data):
    self.method, self.cfg, self.data = method, cfg, data
    self.steps_per_epoch = len(data.x_train) // cfg.batch_size
    self.total_steps = self.steps_per_epoch * cfg.epochs
    self.graphdef = nnx.graphdef(nnx.eval_shape(lambda: CNN(cfg.width, rngs=nnx.Rngs(0))))
    self.init = jax.jit(self._init)
    self.epoch = jax.jit(self._epoch, donate_argnums=0)
    self.accuracy = jax.jit(self._accuracy)

  def _tx(self, rho: jax.Array) -> optax.GradientTransformation:
    return make_optimizer(self.method, rho, self.cfg, self.total_steps)

  def _init(self, key: jax.Array, rho: jax.Array) -> tuple[Any, ...]:
    _, params, stats = nnx.split(CNN(self.cfg.width, rngs=nnx.Rngs(key)), nnx.Param, nnx.BatchStat)
    return params, stats, self._tx(rho).init(params)

  def _loss(self, model: CNN, x: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(model(x, train=True), y).mean()

  def _step(self, rho: jax.Array, carry: tuple[Any, ...], batch: tuple[jax.Array, jax.Array]):
    params, stats, opt_state = carry
    model = nnx.merge(self.graphdef, params, stats)
    if self.method == "sgd":
      loss, grads = nnx.value_and_grad(self._loss)(model, *batch)
    else:
      # The model keeps the batch statistics of the clean pass only.
      loss, grads = fsam_optax.sam_value_and_grad(self._loss)(model, opt_state, *batch)
    _, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    updates, opt_state = self._tx(rho).update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), stats, opt_state), loss

  def _epoch(self, state: tuple[Any, ...], rho: jax.Array, labels: jax.Array, key: jax.Array):
    """One pass over the (noisy) training set in shuffled minibatches."""
    n = self.steps_per_epoch * self.cfg.batch_size
    order = jax.random.permutation(key, len(labels))[:n].reshape(self.steps_per_epoch, -1)
    batches = (jnp.asarray(self.data.x_train)[order], labels[order])
    state, losses = jax.lax.scan(lambda c, b: self._step(rho, c, b), state, batches)
    return state, losses.mean()

  def _accuracy(self, state: tuple[Any, ...], x: jax.Array, y: jax.Array) -> jax.Array:
    params, stats, _ = state
    logits = nnx.merge(self.graphdef, params, stats)(x, train=False)
    return jnp.mean(jnp.argmax(logits, -1) == y)


def noisy_labels(data: Data, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Train and validation labels with the noise of one seed (test stays clean)."""
  return label_noise.noisy_labels(data, noise, seed, noise_scale=100)


def train_grid(
  method: str, noise: float, cfg: Config, data: Data, trainer: Trainer | None = None
) -> dict[str, np.ndarray]:
  """Trains every (rho, seed) pair of one method at one noise level.

  Returns per-run arrays: ``rho`` and ``seed`` of shape (R,), and
  ``train_loss``, ``val_acc``, ``test_acc`` of shape (R, epochs).
  """
  trainer = trainer or Trainer(method, cfg, data)
  rhos = (0.0,) if method == "sgd" else cfg.rho_grid
  runs = [(rho, seed) for rho in rhos for seed in range(cfg.seeds)]
  history = {"train_loss": [], "val_acc": [], "test_acc": []}
  bar = tqdm(total=len(runs) * cfg.epochs, desc=f"{method:>4} noise={noise:.0%}", unit="epoch")
  for rho, seed in runs:
    # The noise depends on the seed only, so every rho sees the same labels.
    y_train, y_val = noisy_labels(data, noise, seed)
    key = jax.random.key(seed)
    state = trainer.init(key, jnp.float32(rho))
    curves = {name: [] for name in history}
    for epoch in range(cfg.epochs):
      state, loss = trainer.epoch(
        state, jnp.float32(rho), jnp.asarray(y_train), jax.random.fold_in(key, epoch)
      )
      # Validation is scored against the noisy labels: all a user would have.
      val = trainer.accuracy(state, data.x_val, y_val)
      test = trainer.accuracy(state, data.x_test, data.y_test)
      for name, value in zip(curves, (loss, val, test), strict=True):
        curves[name].append(float(value))
      bar.set_postfix(rho=rho, seed=seed, loss=f"{float(loss):.3f}", test=f"{float(test):.3f}")
      bar.update()
    for name in history:
      history[name].append(curves[name])
  bar.close()
  return {
    "rho": np.array([r for r, _ in runs]),
    "seed": np.array([s for _, s in runs]),
    **{name: np.array(values) for name, values in history.items()},
  }


def select_rho(runs: dict[str, np.ndarray]) -> float:
  """The rho with the highest mean final validation accuracy (first on ties)."""
  rhos = np.unique(runs["rho"])
  scores = [runs["val_acc"][runs["rho"] == r, -1].mean() for r in rhos]
  return float(rhos[int(np.argmax(scores))])


def run_experiment(cfg: Config, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
  """Runs every method at every noise level; returns one row per (method, noise, rho)."""
  data = load_data()
  log(
    f"digits: {len(data.y_train)} train / {len(data.y_val)} val / {len(data.y_test)} test; "
    f"{jax.device_count()} {jax.default_backend()} device(s)"
  )
  rows = []
  for method in cfg.methods:
    trainer = Trainer(method, cfg, data)
    for noise in cfg.noise:
      runs = train_grid(method, noise, cfg, data, trainer)
      chosen = select_rho(runs)
      for rho in np.unique(runs["rho"]):
        pick = runs["rho"] == rho
        rows.append(
          {
            "method": method,
            "noise": noise,
            "rho": float(rho),
            "chosen": bool(rho == chosen),
            "seeds": int(pick.sum()),
            "val_acc_mean": float(runs["val_acc"][pick, -1].mean()),
            "test_acc_mean": float(runs["test_acc"][pick, -1].mean()),
            "test_acc_std": float(runs["test_acc"][pick, -1].std(ddof=1))
            if pick.sum() > 1
            else 0.0,
            "test_curve": runs["test_acc"][pick].mean(0).tolist(),
            "test_curve_std": runs["test_acc"][pick].std(0).tolist(),
          }
        )
  return rows


def caption(cfg: Config) -> str:
  """What the table measures, in the lines printed above it (and written to results.md)."""
  seeds = "one seed (0)" if cfg.seeds == 1 else f"{cfg.seeds} seeds (0-{cfg.seeds - 1})"
  return "\n".join(
    [
      f"Clean test accuracy (%) on digits at the last epoch (epoch {cfg.epochs}), "
      f"mean ± std over {seeds}.",
      "Rows: rate of symmetric label noise on the train and validation labels; "
      "test labels are clean.",
      f"SAM and F-SAM: the rho in each cell, chosen from {list(cfg.rho_grid)} for the best mean "
      "last-epoch",
      "accuracy on the noisy validation labels.",
    ]
  )


def smoke_warning(cfg: Config) -> str:
  """Says that a --quick run only checks that the job runs."""
  return "\n".join(
    [
      f"SMOKE RUN (--quick: {cfg.epochs} epoch{'s' * (cfg.epochs != 1)}, "
      f"{cfg.seeds} seed{'s' * (cfg.seeds != 1)}): "
      "it only checks that the job runs.",
      "Its numbers mean nothing (SGD can come out above SAM); run without --quick for the result.",
    ]
  )


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
  """Test accuracy (%) of the chosen rho, mean +- std over seeds; methods as columns."""
  chosen = [r for r in rows if r["chosen"]]
  methods = list(dict.fromkeys(r["method"] for r in chosen))
  names = {"sgd": "SGD", "sam": "SAM", "fsam": "F-SAM"}
  lines = [
    "| label noise | " + " | ".join(names.get(m, m) for m in methods) + " |",
    "|---" * (len(methods) + 1) + "|",
  ]
  for noise in dict.fromkeys(r["noise"] for r in chosen):
    cells = []
    for m in methods:
      (r,) = [r for r in chosen if r["method"] == m and r["noise"] == noise]
      rho = "" if m == "sgd" else f" (rho {r['rho']:g})"
      cells.append(f"{100 * r['test_acc_mean']:.2f} ± {100 * r['test_acc_std']:.2f}{rho}")
    lines.append(f"| {noise:.0%} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def write_outputs(rows: Sequence[dict[str, Any]], cfg: Config, seconds: float) -> pathlib.Path:
  """Writes results.csv, results.md, curves.png and config.json; returns the folder."""
  out = pathlib.Path(cfg.out_dir)
  out.mkdir(parents=True, exist_ok=True)
  fields = [
    "method",
    "noise",
    "rho",
    "chosen",
    "seeds",
    "val_acc_mean",
    "test_acc_mean",
    "test_acc_std",
  ]
  with open(out / "results.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
  header = f"{caption(cfg)}\nWall time {seconds:.0f} s.\n\n"
  if cfg.smoke:
    header = f"**{smoke_warning(cfg)}**\n\n{header}"
  (out / "results.md").write_text(header + markdown_table(rows) + "\n")
  (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
  plot_curves(rows, out / "curves.png")
  return out


def plot_curves(rows: Sequence[dict[str, Any]], path: pathlib.Path) -> None:
  """Test accuracy per epoch of the chosen runs, one panel per noise level."""
  import matplotlib

  matplotlib.use("Agg")  # Writes files; needs no display.
  import matplotlib.pyplot as plt

  chosen = [r for r in rows if r["chosen"]]
  noises = list(dict.fromkeys(r["noise"] for r in chosen))
  fig, axes = plt.subplots(1, len(noises), figsize=(4.5 * len(noises), 3.5), squeeze=False)
  for ax, noise in zip(axes[0], noises, strict=True):
    for r in (r for r in chosen if r["noise"] == noise):
      mean, std = np.asarray(r["test_curve"]), np.asarray(r["test_curve_std"])
      epochs = np.arange(1, len(mean) + 1)
      label = r["method"] if r["method"] == "sgd" else f"{r['method']} (rho {r['rho']:g})"
      ax.plot(epochs, 100 * mean, label=label)
      ax.fill_between(epochs, 100 * (mean - std), 100 * (mean + std), alpha=0.2)
    ax.set(title=f"label noise {noise:.0%}", xlabel="epoch", ylabel="test accuracy (%)")
    ax.set_ylim(bottom=max(0.0, ax.get_ylim()[0]))
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


HELP = {
  "epochs": "training epochs of every run; the table reports the last one",
  "batch_size": "minibatch size",
  "lr": "peak learning rate of the cosine schedule, which decays to 0 over the run",
  "momentum": "momentum of the SGD base optimizer, shared by the three methods",
  "weight_decay": "weight decay of the base optimizer",
  "width": "channels of the first convolution; the second has twice as many",
  "seeds": "runs per method, noise level and rho, with seeds 0 to N-1; a seed fixes the label "
  "noise, the initialisation and the minibatch order",
  "noise": "rates (fractions) of symmetric label noise on the train and validation labels, "
  "one table row each",
  "rho_grid": "values of rho tried by SAM and F-SAM; each keeps the one with the best mean "
  "last-epoch accuracy on the noisy validation labels",
  "sigma": "F-SAM's sigma: how much of the moving average of gradients to remove",
  "lmbda": "F-SAM's lmbda: the decay of that moving average",
  "methods": f"methods to train, among {' '.join(METHODS)}",
  "out_dir": "folder for results.csv, results.md, curves.png and config.json",
}


def _shown(value: Any) -> str:
  return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def make_parser() -> argparse.ArgumentParser:
  """The command line: ``--quick`` and one flag per setting of :class:`Config`."""
  defaults, quick = Config(), Config.quick()
  parser = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0],
    epilog="Prints, and writes to results.md, the clean test accuracy at the last epoch, "
    "mean ± std over the seeds, of SGD and of SAM and F-SAM at their chosen rho.",
  )
  smaller = ", ".join(
    f"--{f.name.replace('_', '-')} {_shown(getattr(quick, f.name))}"
    for f in dataclasses.fields(Config)
    if f.name not in ("out_dir", "smoke") and getattr(quick, f.name) != getattr(defaults, f.name)
  )
  parser.add_argument(
    "--quick",
    action="store_true",
    help=f"a smoke run in under a minute ({smaller}), written to {quick.out_dir}; "
    "it checks that the job runs, and its numbers mean nothing",
  )
  for field in dataclasses.fields(Config):
    if field.name == "smoke":  # set by --quick
      continue
    flag = "--" + field.name.replace("_", "-")
    value, small = getattr(defaults, field.name), getattr(quick, field.name)
    shown = f"default {_shown(value)}"
    if small != value:
      shown += f"; with --quick {_shown(small)}"
    help_text = f"{HELP[field.name]} ({shown})"
    if isinstance(value, tuple):
      kind = str if field.name == "methods" else float
      parser.add_argument(flag, type=kind, nargs="+", default=None, help=help_text)
    else:
      parser.add_argument(flag, type=type(value), default=None, help=help_text)
  return parser


def parse_args(argv: Sequence[str] | None = None) -> Config:
  args = vars(make_parser().parse_args(argv))
  quick = args.pop("quick")
  overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in args.items() if v is not None}
  return Config.quick(**overrides) if quick else Config(**overrides)


def _banner(text: str) -> str:
  rule = "=" * max(len(line) for line in text.splitlines())
  return f"{rule}\n{text}\n{rule}"


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  cfg = parse_args(argv)
  if cfg.smoke:
    print(_banner(smoke_warning(cfg)))
  start = time.perf_counter()
  rows = run_experiment(cfg)
  seconds = time.perf_counter() - start
  out = write_outputs(rows, cfg, seconds)
  print()
  if cfg.smoke:
    print(_banner(smoke_warning(cfg)))
  print(caption(cfg))
  print()
  print(markdown_table(rows))
  print(
    f"\nFinished in {seconds:.0f} s. Wrote {out}/results.csv, results.md, curves.png, config.json"
  )
  return rows


if __name__ == "__main__":
  main()
