"""Every-k F-SAM against every-step F-SAM on a training example: time and test accuracy.

Run (on a quiet machine)::

  python benchmarks/schedule_tradeoff.py --rho 0.1 --noise 0.4 --seeds 3 --every 2
  python benchmarks/schedule_tradeoff.py --example examples/fashion_mnist.py --rho ...

``--example`` names a training example with the API of ``examples/digits.py``
(``Config``, ``load_data``, ``noisy_labels``, ``Trainer`` with ``init``,
``epoch`` and ``accuracy``); ``--rho`` (and ``--lmbda``) should be every-step
F-SAM's tuned values at that noise level, which both variants then share.
For each seed the two variants train in turn from the same initialisation,
labels and minibatch order; only the compiled epoch calls are timed
(evaluation excluded; each variant compiles on a warm-up epoch first). The
report gives the ratio of training wall time, the per-seed test accuracies,
their paired differences, and the mean difference with its 95% t-interval.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import pathlib
import statistics
import sys
import time
from typing import Any

import _harness as h
import jax
import jax.numpy as jnp
import optax

import fsam_optax

TIME_TARGET = 0.78  # every-k training time / every-step training time
ACCURACY_TARGET = -0.5  # mean paired test-accuracy difference, percentage points
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def load_example(path: pathlib.Path) -> Any:
  sys.path.insert(0, str(path.parent))  # its shared pieces sit beside it, as when run directly
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


def scheduled_trainer(example: Any, cfg: Any, data: Any, every: int | None) -> Any:
  """The example's F-SAM trainer, with the F-SAM step every ``every`` steps."""

  class Trainer(example.Trainer):
    def _tx(self, rho: jax.Array) -> optax.GradientTransformation:
      base = example.make_optimizer("sgd", rho, self.cfg, self.total_steps)
      first = fsam_optax.fsam(rho, sigma=self.cfg.sigma, lmbda=self.cfg.lmbda, every=every)
      return optax.chain(first, base)

  return Trainer("fsam", cfg, data)


def train(trainer: Any, cfg: Any, data: Any, rho: float, labels: Any, seed: int) -> tuple:
  """Seconds spent in the epoch calls, and the final test accuracy."""
  key = jax.random.key(seed)
  state = trainer.init(key, jnp.float32(rho))
  seconds = 0.0
  for epoch in range(cfg.epochs):
    start = time.perf_counter()
    state, loss = trainer.epoch(state, jnp.float32(rho), labels, jax.random.fold_in(key, epoch))
    jax.block_until_ready((state, loss))
    seconds += time.perf_counter() - start
  return seconds, float(trainer.accuracy(state, data.x_test, data.y_test))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  root = pathlib.Path(__file__).resolve().parents[1]
  parser.add_argument(
    "--example",
    type=pathlib.Path,
    default=root / "examples" / "digits.py",
    help="training example to run (default examples/digits.py)",
  )
  parser.add_argument("--rho", type=float, required=True, help="every-step F-SAM's tuned rho")
  parser.add_argument("--lmbda", type=float, default=None, help="default: the example's")
  parser.add_argument(
    "--noise", type=float, default=0.4, help="rate of symmetric label noise (default 0.4)"
  )
  parser.add_argument(
    "--seeds", type=int, default=3, help="paired seeds 0..N-1, N from 2 to 10 (default 3)"
  )
  parser.add_argument(
    "--every", type=int, default=2, help="the F-SAM step every k steps (default 2)"
  )
  parser.add_argument("--epochs", type=int, default=None, help="default: the example's")
  parser.add_argument("--quick", action="store_true", help="the example's smoke settings")
  args = parser.parse_args()
  if not 2 <= args.seeds <= len(T_975) + 1:
    parser.error(f"--seeds must be in [2, {len(T_975) + 1}] for the paired interval")

  example = load_example(args.example)
  cfg = example.Config.quick() if args.quick else example.Config()
  overrides = {"epochs": args.epochs, "lmbda": args.lmbda}
  cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
  data = example.load_data()
  trainers = {
    "every step": scheduled_trainer(example, cfg, data, None),
    f"every {args.every}": scheduled_trainer(example, cfg, data, args.every),
  }
  labels0 = jnp.asarray(example.noisy_labels(data, args.noise, 0)[0])
  for trainer in trainers.values():  # compile outside the timed calls
    state = trainer.init(jax.random.key(0), jnp.float32(args.rho))
    jax.block_until_ready(trainer.epoch(state, jnp.float32(args.rho), labels0, jax.random.key(1)))

  print(h.header(f"Every-{args.every} F-SAM vs every-step F-SAM: {args.example.name}"))
  print(
    f"noise {args.noise:.0%}; rho={args.rho}, sigma={cfg.sigma}, lmbda={cfg.lmbda}; "
    f"{cfg.epochs} epochs of {trainers['every step'].steps_per_epoch} steps; "
    f"{args.seeds} seeds\n"
  )
  seconds = {name: [] for name in trainers}
  accuracy = {name: [] for name in trainers}
  for seed in range(args.seeds):
    labels = jnp.asarray(example.noisy_labels(data, args.noise, seed)[0])
    names = list(trainers) if seed % 2 == 0 else list(trainers)[::-1]  # alternate the order
    for name in names:
      s, acc = train(trainers[name], cfg, data, args.rho, labels, seed)
      seconds[name].append(s)
      accuracy[name].append(100 * acc)

  every, skip = list(trainers)
  diffs = [b - a for a, b in zip(accuracy[every], accuracy[skip], strict=True)]
  rows = [
    [
      str(seed),
      f"{seconds[every][seed]:.2f}",
      f"{seconds[skip][seed]:.2f}",
      f"{seconds[skip][seed] / seconds[every][seed]:.3f}",
      f"{accuracy[every][seed]:.2f}",
      f"{accuracy[skip][seed]:.2f}",
      f"{diffs[seed]:+.2f}",
    ]
    for seed in range(args.seeds)
  ]
  print(
    h.table(
      rows,
      [
        "seed",
        f"train s, {every}",
        f"train s, {skip}",
        "time ratio",
        f"test %, {every}",
        f"test %, {skip}",
        "difference",
      ],
    )
  )
  ratio = sum(seconds[skip]) / sum(seconds[every])
  mean = statistics.mean(diffs)
  half = T_975[len(diffs) - 1] * statistics.stdev(diffs) / len(diffs) ** 0.5
  print(
    f"\ntraining time, {skip} / {every}: {ratio:.3f}; "
    f"target <= {TIME_TARGET}: {'met' if ratio <= TIME_TARGET else 'MISSED'}"
  )
  print(
    f"test accuracy, {skip} - {every}: mean {mean:+.2f} points, 95% t-interval "
    f"[{mean - half:+.2f}, {mean + half:+.2f}] over {len(diffs)} paired seeds; "
    f"target mean >= {ACCURACY_TARGET}: {'met' if mean >= ACCURACY_TARGET else 'MISSED'}"
  )
  print(f"load average (1/5/15 min) at end: {h.load_average()}")


if __name__ == "__main__":
  main()
