"""Compile time of one F-SAM step against a hand-written SAM step, on a 1,000-leaf pytree.

Both steps are jitted train steps with SGD-momentum after the perturbation.
The hand-written SAM step is the textbook one: a value_and_grad, a global-norm
perturbation, a second value_and_grad, an optax update. Compile time is
the wall and CPU time of ``jax.jit(step).lower(...).compile()`` (tracing
included), the median of a few fresh compilations; on a shared machine
trust the CPU column more.

Run: python benchmarks/large_tree.py [--leaves 1000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import fsam_optax


def make_params(leaves: int) -> dict[str, jax.Array]:
  """``leaves`` small arrays of varied shapes, as a wide flat layer dict."""
  keys = jax.random.split(jax.random.key(0), leaves)
  return {f"p{i:04d}": jax.random.normal(k, (2 + i % 5, 3)) for i, k in enumerate(keys)}


def loss_fn(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
  # A per-leaf quadratic, so every gradient is non-trivial and the model adds
  # few ops next to the optimizer's per-leaf work. (A single concatenation of
  # the leaves compiles far slower: its gradient is 1,000 slices.)
  return jnp.sum(jnp.stack([jnp.sum(x * p + 0.05 * p * p) for p in params.values()]))


def fsam_step(tx: optax.GradientTransformation) -> Callable[..., Any]:
  grad_fn = fsam_optax.sam_value_and_grad(loss_fn)

  def step(params, opt_state, x):
    loss, grads = grad_fn(params, opt_state, x)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def hand_written_sam_step(tx: optax.GradientTransformation, rho: float) -> Callable[..., Any]:
  def step(params, opt_state, x):
    loss, g = jax.value_and_grad(loss_fn)(params, x)
    scale = rho / (optax.global_norm(g) + 1e-12)
    perturbed = jax.tree.map(lambda p, gi: p + scale * gi, params, g)
    g_p = jax.grad(loss_fn)(perturbed, x)
    updates, opt_state = tx.update(g_p, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def compile_seconds(step: Callable[..., Any], *args: Any, repeats: int) -> tuple[float, float]:
  """Median wall and CPU seconds of tracing, lowering and compiling ``step``."""
  wall, cpu = [], []
  for _ in range(repeats):
    start, start_cpu = time.perf_counter(), time.process_time()
    jax.jit(step).lower(*args).compile()  # a fresh jit object: no cache hit
    wall.append(time.perf_counter() - start)
    cpu.append(time.process_time() - start_cpu)
  return statistics.median(wall), statistics.median(cpu)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--leaves", type=int, default=1000, help="leaves of the pytree (default 1000)"
  )
  parser.add_argument(
    "--repeats", type=int, default=3, help="fresh compilations per step, median (default 3)"
  )
  args = parser.parse_args()
  params, x = make_params(args.leaves), jnp.float32(0.5)
  fsam_tx = optax.chain(
    fsam_optax.fsam(rho=0.2, sigma=1.0, lmbda=0.6), optax.sgd(0.05, momentum=0.9)
  )
  sgd = optax.sgd(0.05, momentum=0.9)
  rows = {
    "fsam_optax F-SAM step": (fsam_step(fsam_tx), fsam_tx.init(params)),
    "fsam_optax SAM step (sigma=0)": (
      fsam_step(sam_tx := optax.chain(fsam_optax.sam(rho=0.2), sgd)),
      sam_tx.init(params),
    ),
    "hand-written SAM step": (hand_written_sam_step(sgd, 0.2), sgd.init(params)),
  }
  print(
    f"{args.leaves} leaves, jax {jax.__version__}, {jax.devices()[0].platform},"
    f" median of {args.repeats}"
  )
  for name, (step, state) in rows.items():
    wall, cpu = compile_seconds(step, params, state, x, repeats=args.repeats)
    print(f"{name:32s} trace+compile {wall:6.2f} s wall {cpu:6.2f} s CPU")


if __name__ == "__main__":
  main()
