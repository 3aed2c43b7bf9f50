"""Compile time of the F-SAM step (and its cheaper schedules) against hand-written SAM.

Run: ``python benchmarks/compile_time.py`` (about a minute). Each sample
builds the step from fresh closures, so nothing is reused from a cache:
tracing and lowering (``jax.jit(step).lower``) and XLA compilation
(``.compile()``) are timed separately; the variants take turns in a rotating
order.
"""

from __future__ import annotations

import argparse
import statistics
import time

import _harness as h
import jax

COMPARED = {
  **{name: h.VARIANTS[name] for name in ("F-SAM (fsam_optax)", "SAM (hand-written)")},
  **h.SCHEDULED,
}
TARGET = 1.2


def sample(model: h.Model, make: h.Callable, params: object, batch: object) -> tuple[float, float]:
  """Seconds to trace and lower, and to compile, a freshly built step."""
  variant = make(h.make_loss(model))  # new closures: no tracing cache applies
  opt_state = variant.init(params)
  start = time.perf_counter()
  lowered = h.jit_step(variant.step).lower(params, opt_state, batch)
  traced = time.perf_counter()
  lowered.compile()
  return traced - start, time.perf_counter() - traced


def measure(model: h.Model, repeats: int) -> str:
  params = model.init(jax.random.PRNGKey(0))
  batch = jax.device_put(h.make_batch(model))
  names = list(COMPARED)
  for name in names:  # warm JAX's own caches (jnp helpers) before timing
    sample(model, COMPARED[name], params, batch)
  lower: dict[str, list[float]] = {n: [] for n in names}
  compile_: dict[str, list[float]] = {n: [] for n in names}
  for r in range(repeats):
    for name in names[r % len(names) :] + names[: r % len(names)]:
      t_lower, t_compile = sample(model, COMPARED[name], params, batch)
      lower[name].append(t_lower)
      compile_[name].append(t_compile)
  total = {n: [a + b for a, b in zip(lower[n], compile_[n], strict=True)] for n in names}
  rows = []
  for name in names:
    cells = [name]
    for samples in (lower[name], compile_[name], total[name]):
      med, spread = h.summary(samples)
      cells += [f"{med:.0f}", spread.replace(".00", "")]
    rows.append(cells)
  fsam, sam = names[:2]
  ratio = statistics.median(total[fsam]) / statistics.median(total[sam])
  xla_ratio = statistics.median(compile_[fsam]) / statistics.median(compile_[sam])
  verdict = "met" if ratio <= TARGET else "MISSED"
  return "\n".join(
    [
      f"## {model.name}: {h.param_count(params):,} parameters, batch {model.batch_size}",
      f"{repeats} fresh builds of each, in rotating order; ms",
      "",
      h.table(
        rows,
        ["variant", "trace+lower", "min-max", "compile", "min-max", "total", "min-max"],
      ),
      "",
      f"F-SAM / hand-written SAM, total: {ratio:.3f} (XLA compile alone: {xla_ratio:.3f}); "
      f"target <= {TARGET}: {verdict}",
    ]
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--repeats", type=int, default=7, help="fresh compilations per variant (default 7)"
  )
  parser.add_argument("--smoke", action="store_true", help="a tiny MLP, one repeat")
  args = parser.parse_args()
  if args.smoke:
    models = [h.mlp(width=32, batch_size=8)]
    args.repeats = 1
  else:
    models = [h.mlp(), h.cnn()]
  # A persistent compilation cache would turn later samples into cache reads.
  jax.config.update("jax_enable_compilation_cache", False)
  print(h.header("Compile time: F-SAM (every step and cheaper schedules) vs hand-written SAM"))
  print()
  for model in models:
    print(measure(model, args.repeats))
    print()
  print(f"load average (1/5/15 min) at end: {h.load_average()}")


if __name__ == "__main__":
  main()
