"""Memory traffic of the compiled steps: XLA's bytes accessed and temporaries.

Run: ``python benchmarks/traffic.py`` (seconds; it compiles, it does not run).
For each step variant, from ``jax.jit(step).lower(...).compile()``:
``cost_analysis()["bytes accessed"]`` (every operand read and result written
by the kernels of one step) and ``memory_analysis().temp_size_in_bytes``, both
in units of one float32 parameter-size buffer, with and without donating the
params and optimizer state. These are compile-time figures: the machine's load
does not change them, but the jaxlib version does.

Exact F-SAM reads the moving average twice (for the norm of d and for e) and
writes it once, so its floor is hand-written SAM + 3 parameter-sizes.
``--family`` adds GSAM, VaSSO and LookSAM, and holds GSAM and VaSSO to F-SAM's
target.
"""

from __future__ import annotations

import argparse
from typing import Any, NamedTuple

import _harness as h
import jax

FLOOR = 3.0
TARGET = 3.5  # largest allowed F-SAM - hand-written SAM, parameter-sizes
# With --family: the methods held to F-SAM's traffic target (two passes, one buffer).
FAMILY_TARGETS = ("GSAM (fsam_optax)", "VaSSO (fsam_optax)")


class Traffic(NamedTuple):
  bytes_accessed: float  # parameter-sizes
  temp: float  # parameter-sizes


def measure(model: h.Model, donate: bool, variants: dict[str, Any]) -> dict[str, Traffic]:
  params = model.init(jax.random.PRNGKey(0))
  batch = jax.device_put(h.make_batch(model))
  loss_fn = h.make_loss(model)
  unit = h.tree_bytes(params)
  out = {}
  for name, make in variants.items():
    variant = make(loss_fn)
    jitted = jax.jit(variant.step, donate_argnums=(0, 1) if donate else ())
    compiled = jitted.lower(params, variant.init(params), batch).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost  # a list in older jaxlibs
    temp = compiled.memory_analysis().temp_size_in_bytes
    out[name] = Traffic(cost["bytes accessed"] / unit, temp / unit)
  return out


def report(model: h.Model, donate: bool, variants: dict[str, Any]) -> str:
  stats = measure(model, donate, variants)
  sam = stats["SAM (hand-written)"]
  rows = [
    [
      name,
      f"{t.bytes_accessed:.2f}",
      f"{t.bytes_accessed - sam.bytes_accessed:+.2f}",
      f"{t.temp:.2f}",
      f"{t.temp - sam.temp:+.2f}",
    ]
    for name, t in stats.items()
  ]
  lines = [
    f"### {'with' if donate else 'without'} donation of params and optimizer state",
    "",
    h.table(rows, ["variant", "bytes accessed", "vs hand SAM", "temp", "temp vs SAM"]),
    "",
  ]
  for name in ("F-SAM (fsam_optax)", *FAMILY_TARGETS):
    if name not in stats:
      continue
    extra = stats[name].bytes_accessed - sam.bytes_accessed
    verdict = "met" if extra <= TARGET else "MISSED"
    lines.append(
      f"{name.removesuffix(' (fsam_optax)')} bytes accessed - hand-written SAM: {extra:+.2f} "
      f"parameter-sizes (F-SAM's floor +{FLOOR:.0f}); target <= +{TARGET}: {verdict}"
    )
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true", help="a tiny MLP")
  parser.add_argument("--family", action="store_true", help="also GSAM, VaSSO and LookSAM")
  args = parser.parse_args()
  model = h.mlp(width=32, batch_size=8) if args.smoke else h.mlp()
  params = model.init(jax.random.PRNGKey(0))
  print(h.header("Memory traffic: bytes accessed and temporaries of the compiled step"))
  print(
    f"\n## {model.name}: {h.param_count(params):,} parameters, batch {model.batch_size}\n"
    f"units: one float32 parameter-size buffer = {h.tree_bytes(params):,} bytes\n"
  )
  variants = {**h.VARIANTS, **h.SCHEDULED, **(h.FAMILY if args.family else {})}
  for donate in (False, True):
    print(report(model, donate, variants))
    print()


if __name__ == "__main__":
  main()
