"""Steps per second: this package's F-SAM (jitted JAX) against PyTorch's FriendlySAM.

Run: ``python benchmarks/torch_compare.py`` (two to three minutes). It needs
``torch`` (CPU build) and ``pytorch-optimizer``; install torch first, so that
pip does not fetch a CUDA build for pytorch-optimizer:
``pip install torch==2.13.0 && pip install pytorch-optimizer``.

Both sides train the same architecture on the same batch with the same
hyperparameters (SGD with momentum as base optimizer), with as many threads as
there are cores. Before timing, a few steps of both from the same initial MLP
weights are compared, so that the speed figures compare the same algorithm.
"""

from __future__ import annotations

import argparse
import os
import statistics

import _harness as h
import jax
import jax.numpy as jnp
import numpy as np
import pytorch_optimizer
import torch
import torch.nn.functional as F
from torch import nn


def torch_mlp(params: list[dict[str, jax.Array]]) -> nn.Module:
  """The harness MLP, with its weights copied from the JAX parameters."""
  layers = []
  for i, layer in enumerate(params):
    w = np.asarray(layer["w"])
    linear = nn.Linear(w.shape[0], w.shape[1])
    with torch.no_grad():
      linear.weight.copy_(torch.from_numpy(w.T.copy()))
      linear.bias.copy_(torch.from_numpy(np.array(layer["b"])))
    layers.append(linear)
    if i < len(params) - 1:
      layers.append(nn.ReLU())
  return nn.Sequential(*layers)


def torch_cnn(channels: tuple[int, ...]) -> nn.Module:
  """The harness CNN's architecture (its own initial weights; only speed is compared).

  ``padding=1`` gives the same output sizes as JAX's ``"SAME"`` at strides 1
  and 2, so the work per step is the same.
  """
  chans = [3, *channels]
  layers: list[nn.Module] = []
  for c_in, c_out, stride in zip(chans[:-1], chans[1:], h.CNN_STRIDES, strict=True):
    layers += [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.ReLU()]
  layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(chans[-1], 10)]
  return nn.Sequential(*layers)


def friendly_sam(model: nn.Module) -> pytorch_optimizer.FriendlySAM:
  return pytorch_optimizer.FriendlySAM(
    model.parameters(),
    torch.optim.SGD,
    rho=h.RHO,
    sigma=h.SIGMA,
    lmbda=h.LMBDA,
    perturb_eps=h.EPS,
    lr=h.LEARNING_RATE,
    momentum=h.MOMENTUM,
  )


class TorchRunner:
  """Eager FriendlySAM steps, as its documentation writes them."""

  def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    self.model, self.x, self.y = model, x, y
    self.optimizer = friendly_sam(model)

  def closure(self) -> torch.Tensor:
    self.optimizer.zero_grad()
    loss = F.cross_entropy(self.model(self.x), self.y)
    loss.backward()
    return loss

  def __call__(self, n: int) -> None:
    for _ in range(n):
      self.closure()
      self.optimizer.step(self.closure)


def agreement(steps: int = 3) -> float:
  """Largest |JAX - PyTorch| over the MLP's weights after ``steps`` F-SAM steps."""
  model = h.mlp()
  params = model.init(jax.random.PRNGKey(0))
  x, y = h.make_batch(model)
  module = torch_mlp(params)
  variant = h.fsam_variant(h.make_loss(model))
  runner = h.Runner(jax.jit(variant.step), params, variant.init(params), (x, y))
  runner(steps)
  TorchRunner(module, torch.from_numpy(x), torch.from_numpy(y).long())(steps)
  diffs = []
  for layer, linear in zip(runner.params, module[::2], strict=True):
    diffs.append(np.abs(np.asarray(layer["w"]) - linear.weight.detach().numpy().T).max())
    diffs.append(np.abs(np.asarray(layer["b"]) - linear.bias.detach().numpy()).max())
  return float(max(diffs))


def measure(model: h.Model, module: nn.Module, rounds: int, steps_per_round: int) -> str:
  params = model.init(jax.random.PRNGKey(0))
  x, y = h.make_batch(model)
  variant = h.fsam_variant(h.make_loss(model))
  batch = (jnp.asarray(x), jnp.asarray(y))
  x_torch = torch.from_numpy(x if x.ndim == 2 else x.transpose(0, 3, 1, 2).copy())
  runners = {
    "JAX F-SAM (fsam_optax, jit)": h.Runner(
      h.jit_step(variant.step), params, variant.init(params), batch
    ),
    "PyTorch FriendlySAM (eager)": TorchRunner(module, x_torch, torch.from_numpy(y).long()),
  }
  times = h.interleaved(runners, rounds, steps_per_round)
  rows = []
  for name, samples in times.items():
    med, spread = h.summary(samples)
    rate = [1 / t for t in samples]
    rows.append([name, f"{med:.2f}", spread, f"{statistics.median(rate):.2f}"])
  jax_name, torch_name = list(times)
  speedup = statistics.median(times[torch_name]) / statistics.median(times[jax_name])
  return "\n".join(
    [
      f"## {model.name}: {h.param_count(params):,} parameters, batch {model.batch_size}",
      f"{rounds} interleaved rounds of {steps_per_round} steps",
      "",
      h.table(rows, ["implementation", "ms/step median", "min-max", "steps/s median"]),
      "",
      f"JAX F-SAM steps/s / PyTorch FriendlySAM steps/s: {speedup:.2f}",
    ]
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--rounds", type=int, default=20, help="interleaved rounds, medians reported (default 20)"
  )
  parser.add_argument(
    "--steps-per-round", type=int, default=3, help="steps timed per sample (default 3)"
  )
  args = parser.parse_args()
  # XLA's CPU backend uses every core; give PyTorch the same.
  torch.set_num_threads(os.cpu_count() or 1)
  packages = ("jax", "jaxlib", "optax", "fsam_optax", "torch", "pytorch_optimizer")
  print(h.header("PyTorch comparison: F-SAM steps per second", packages))
  print(
    f"torch threads: {torch.get_num_threads()}; base optimizer SGD(lr={h.LEARNING_RATE}, "
    f"momentum={h.MOMENTUM}); rho={h.RHO}, sigma={h.SIGMA}, lmbda={h.LMBDA}\n"
  )
  print(
    f"same algorithm check: max |JAX - PyTorch| over MLP weights after 3 steps from the "
    f"same start: {agreement():.2e}\n"
  )
  cnn = h.cnn()
  for model, module in ((h.mlp(), None), (cnn, torch_cnn((16, 32, 32)))):
    if module is None:
      module = torch_mlp(model.init(jax.random.PRNGKey(0)))
    print(measure(model, module, args.rounds, args.steps_per_round))
    print()
  print(f"load average (1/5/15 min) at end: {h.load_average()}")


if __name__ == "__main__":
  main()
