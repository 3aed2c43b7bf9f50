"""ResNet-18 on CIFAR-shaped data: F-SAM against SGD, and against PyTorch's FriendlySAM.

Meant for a GPU: ``python benchmarks/resnet18.py --device gpu`` (batch 128,
synthetic data) times every-step F-SAM, SAM and SGD, and every-2 F-SAM and
LookSAM (every 5) with the SAM-or-one-pass choice made on the device (the
state's schedule, a ``lax.cond``) and on the host (``fsam_optax.is_sam_step``
and a static ``sam_step``: two programs, the call and the dispatch inside the
timed loop); ``--torch`` adds PyTorch's FriendlySAM and SGD. Each program is
compiled before the timing: the script prints each variant's compile time, and
the seconds spent compiling, stepping and in all. ``--smoke`` runs a tiny width
and batch on the CPU, one round, to check the script: it spends minutes
compiling, and its figures say nothing about the GPU targets (F-SAM at
most 2.05x an SGD step; every-2 F-SAM chosen on the host at most 0.80 of
F-SAM's step, LookSAM every 5 chosen on the host at most 0.65 of SAM's; JAX
F-SAM at least 1.5x the steps per second of PyTorch's FriendlySAM).

Needs ``flax``; ``--torch`` also needs ``torch`` and ``pytorch-optimizer``.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import _harness as h
import jax
import optax
from flax import nnx

import fsam_optax

# The one ResNet-18 of the repository, in examples/ beside the scripts that train it.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
from resnet import ResNet18

NUM_CLASSES = 100
RATIOS = (
  # (variant, reference, largest allowed ratio of median step times on a GPU, or None)
  ("JAX F-SAM", "JAX SGD", 2.05),
  ("JAX F-SAM", "JAX SAM", None),
  ("JAX F-SAM every 2, device choice", "JAX F-SAM", None),
  ("JAX F-SAM every 2, host choice", "JAX F-SAM", 0.80),
  ("JAX LookSAM every 5, device choice", "JAX SAM", None),
  ("JAX LookSAM every 5, host choice", "JAX SAM", 0.65),
)


def jax_variants(graphdef: nnx.GraphDef) -> dict[str, h.Variant]:
  """The JAX steps, each on the state ``(params, batch statistics)``."""

  def loss_fn(params: Any, batch_stats: Any, x: jax.Array, y: jax.Array) -> tuple:
    # copy=True: the forward pass writes BatchNorm statistics inside value_and_grad.
    model = nnx.merge(graphdef, params, batch_stats, copy=True)
    logits = model(x, train=True)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, nnx.state(model, nnx.BatchStat)

  sgd_tx = h.base_optimizer()
  # has_aux: the batch statistics come from the clean pass only.
  sam_grad = fsam_optax.sam_value_and_grad(loss_fn, has_aux=True)

  def sgd_step(state, opt_state, batch):
    params, stats = state
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, *batch)
    updates, opt_state = sgd_tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), stats), opt_state, loss

  def sam_like(front: optax.GradientTransformation, host_choice: bool = False) -> h.Variant:
    """``front`` before the base optimizer; ``host_choice``: the step takes ``sam_step``."""
    tx = optax.chain(front, h.base_optimizer())

    def step(state, opt_state, batch, sam_step=None):
      params, stats = state
      (loss, stats), grads = sam_grad(params, opt_state, stats, *batch, sam_step=sam_step)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), stats), opt_state, loss

    return h.Variant(step, lambda state: tx.init(state[0]), host_choice)

  fsam = lambda **schedule: fsam_optax.fsam(rho=h.RHO, sigma=h.SIGMA, lmbda=h.LMBDA, **schedule)
  return {
    "JAX F-SAM": sam_like(fsam()),
    "JAX SAM": sam_like(fsam_optax.sam(rho=h.RHO)),
    "JAX F-SAM every 2, device choice": sam_like(fsam(every=2)),
    "JAX F-SAM every 2, host choice": sam_like(fsam(every=2), host_choice=True),
    "JAX LookSAM every 5, device choice": sam_like(h.looksam_every_5()),
    "JAX LookSAM every 5, host choice": sam_like(h.looksam_every_5(), host_choice=True),
    "JAX SGD": h.Variant(sgd_step, lambda state: sgd_tx.init(state[0])),
  }


def torch_runners(
  batch: tuple, device: str, num_classes: int, width: int
) -> dict[str, Callable[[int], None]]:
  """PyTorch FriendlySAM and SGD on the same ResNet-18, in eager mode."""
  import torch
  import torch.nn.functional as F
  from torch import nn as tnn
  from torch_compare import friendly_sam  # the same settings in both torch benchmarks

  dev = torch.device("cuda" if device == "gpu" else "cpu")

  class Block(tnn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
      super().__init__()
      self.conv1 = tnn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
      self.bn1 = tnn.BatchNorm2d(c_out)
      self.conv2 = tnn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
      self.bn2 = tnn.BatchNorm2d(c_out)
      self.shortcut = tnn.Sequential()
      if stride != 1 or c_in != c_out:
        self.shortcut = tnn.Sequential(
          tnn.Conv2d(c_in, c_out, 1, stride, bias=False), tnn.BatchNorm2d(c_out)
        )

    def forward(self, x):
      y = F.relu(self.bn1(self.conv1(x)))
      return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))

  def resnet18():
    # The layout of examples/resnet.py: a 3x3 stem and four stages of two blocks.
    stem = [tnn.Conv2d(3, width, 3, 1, 1, bias=False), tnn.BatchNorm2d(width), tnn.ReLU()]
    layers: list[tnn.Module] = stem
    c_in = width
    for stage, stride in enumerate((1, 2, 2, 2)):
      channels = width * 2**stage
      layers += [Block(c_in, channels, stride), Block(channels, channels, 1)]
      c_in = channels
    layers += [tnn.AdaptiveAvgPool2d(1), tnn.Flatten(), tnn.Linear(c_in, num_classes)]
    return tnn.Sequential(*layers).to(dev).train()

  x = torch.from_numpy(batch[0].transpose(0, 3, 1, 2).copy()).to(dev)
  y = torch.from_numpy(batch[1]).long().to(dev)
  sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

  def fsam_runner() -> Callable[[int], None]:
    model = resnet18()
    opt = friendly_sam(model)

    def closure():
      opt.zero_grad()
      loss = F.cross_entropy(model(x), y)
      loss.backward()
      return loss

    def run(n: int) -> None:
      for _ in range(n):
        closure()
        opt.step(closure)
      sync()

    return run

  def sgd_runner() -> Callable[[int], None]:
    model = resnet18()
    opt = torch.optim.SGD(model.parameters(), lr=h.LEARNING_RATE, momentum=h.MOMENTUM)

    def run(n: int) -> None:
      for _ in range(n):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
      sync()

    return run

  return {"PyTorch FriendlySAM": fsam_runner(), "PyTorch SGD": sgd_runner()}


def device_line(device: jax.Device) -> str:
  """The device's name and its platform's version (the CUDA or ROCm release on a GPU)."""
  return f"device: {device.device_kind} ({device.platform} {device.client.platform_version})"


def jax_runners(
  graphdef: nnx.GraphDef, state: Any, batch: tuple, device: jax.Device
) -> dict[str, h.Runner]:
  """A runner of each JAX variant, its state on ``device``."""
  runners = {}
  for name, variant in jax_variants(graphdef).items():
    # Each variant donates its own copy of (params, batch statistics).
    own = jax.tree.map(lambda a: a.copy(), state)
    runners[name] = h.Runner.of(variant, own, batch, device=device)
  return runners


def main() -> None:
  start = time.perf_counter()
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--device", choices=("cpu", "gpu"), default="gpu", help="where to run (default gpu)"
  )
  parser.add_argument("--batch", type=int, default=128, help="batch size (default 128)")
  parser.add_argument(
    "--rounds", type=int, default=20, help="interleaved rounds, medians reported (default 20)"
  )
  parser.add_argument(
    "--steps",
    type=int,
    default=h.SCHEDULE_PERIOD,
    help=f"steps per round, a multiple of {h.SCHEDULE_PERIOD} so that every sample holds the "
    f"schedules' share of SAM steps (default {h.SCHEDULE_PERIOD})",
  )
  parser.add_argument(
    "--width", type=int, default=64, help="channels of the first stage (default 64)"
  )
  parser.add_argument("--torch", action="store_true", help="also time PyTorch on the device")
  parser.add_argument(
    "--smoke",
    action="store_true",
    help="width 2, batch 2, one round, on the CPU: checks the script, measures nothing",
  )
  args = parser.parse_args()
  if args.smoke:
    args.device, args.width, args.batch, args.rounds = "cpu", 2, 2, 1
  if args.steps < 1 or args.steps % h.SCHEDULE_PERIOD:
    parser.error(f"--steps must be a positive multiple of {h.SCHEDULE_PERIOD}")

  device = jax.devices(args.device)[0]
  packages = ["jax", "jaxlib", "optax", "flax", "fsam_optax"]
  if args.torch:
    packages += ["torch", "pytorch_optimizer"]
  print(h.header(f"ResNet-18, CIFAR-shaped synthetic batch, on {device}", packages))
  print(device_line(device))
  print(
    f"width {args.width}, batch {args.batch}, {args.rounds} interleaved rounds of "
    f"{args.steps} steps\n"
  )

  x, y = h.synthetic_batch(args.batch, (32, 32, 3), NUM_CLASSES)
  with jax.default_device(device):
    model = ResNet18(NUM_CLASSES, args.width, rngs=nnx.Rngs(0))
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    batch = jax.device_put((x, y), device)
    jax_only = jax_runners(graphdef, (params, batch_stats), batch, device)
  # Compiled outside the default-device context, as the steps run: jit's cache
  # tells the two apart, and would compile again.
  compile_s = {name: runner.compile() for name, runner in jax_only.items()}
  runners: dict[str, Callable[[int], None]] = dict(jax_only)
  if args.torch:
    runners.update(torch_runners((x, y), args.device, NUM_CLASSES, args.width))
  timing_start = time.perf_counter()
  times = h.interleaved(runners, args.rounds, args.steps, warmup_steps=h.SCHEDULE_PERIOD)
  timing_s = time.perf_counter() - timing_start

  med = {name: statistics.median(t) for name, t in times.items()}
  rows = []
  for name, samples in times.items():
    m, spread = h.summary(samples)
    compiled = f"{compile_s[name]:.1f}" if name in compile_s else "eager"
    rows.append([name, f"{m:.2f}", spread, f"{1 / med[name]:.2f}", compiled])
  print(h.table(rows, ["variant", "ms/step median", "min-max", "steps/s", "compile s"]))
  print()
  for name, ref, limit in RATIOS:
    target = "" if limit is None else f" (GPU target <= {limit})"
    print(f"{name} / {ref} step time: {med[name] / med[ref]:.3f}{target}")
  if args.torch:
    print(
      f"JAX F-SAM steps/s / PyTorch FriendlySAM steps/s: "
      f"{med['PyTorch FriendlySAM'] / med['JAX F-SAM']:.2f} (GPU target >= 1.5)"
    )
  print(
    f"compile: {sum(compile_s.values()):.1f} s in all, before the timing; warm-up and timed "
    f"steps: {timing_s:.1f} s; whole run: {time.perf_counter() - start:.1f} s"
  )
  print(f"load average (1/5/15 min) at end: {h.load_average()}")


if __name__ == "__main__":
  main()
