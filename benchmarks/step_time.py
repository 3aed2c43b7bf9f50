"""Step time of F-SAM against hand-written SAM, optax.contrib.sam and SGD.

Run: ``python benchmarks/step_time.py`` (about two to three minutes on two
CPU cores). ``--smoke`` runs a tiny MLP for a few steps, to check the script.
"""

from __future__ import annotations

import argparse
import statistics

import _harness as h
import jax

TARGETS = (
  # (reference, largest allowed F-SAM / reference ratio of median step times)
  ("SAM (hand-written)", 1.05),
  ("SGD (one pass)", 2.15),
  ("optax.contrib.sam (opaque)", 1.0),
)


def measure(model: h.Model, rounds: int, steps_per_round: int) -> dict[str, list[float]]:
  params = model.init(jax.random.PRNGKey(0))
  batch = jax.device_put(h.make_batch(model))
  loss_fn = h.make_loss(model)
  runners = {}
  for name, make in h.VARIANTS.items():
    variant = make(loss_fn)
    own = jax.tree.map(lambda x: x.copy(), params)  # each variant donates its own copy
    runners[name] = h.Runner(h.jit_step(variant.step), own, variant.tx.init(own), batch)
  return h.interleaved(runners, rounds, steps_per_round)


def report(model: h.Model, times: dict[str, list[float]]) -> str:
  params = model.init(jax.random.PRNGKey(0))
  med = {name: statistics.median(t) for name, t in times.items()}
  rows = []
  for name, samples in times.items():
    m, spread = h.summary(samples)
    rows.append(
      [
        name,
        f"{m:.2f}",
        spread,
        f"{med[name] / med['SAM (hand-written)']:.3f}",
        f"{med[name] / med['SGD (one pass)']:.3f}",
      ]
    )
  lines = [
    f"## {model.name}: {h.param_count(params):,} parameters, batch {model.batch_size}",
    f"{len(times['SGD (one pass)'])} interleaved rounds; ms per step",
    "",
    h.table(rows, ["variant", "median", "min-max", "x hand SAM", "x SGD"]),
    "",
  ]
  fsam = times["F-SAM (fsam_optax)"]
  for ref, limit in TARGETS:
    ratio = med["F-SAM (fsam_optax)"] / med[ref]
    # The per-round ratio pairs samples taken seconds apart, so a load burst
    # from another job moves numerator and denominator together.
    paired = statistics.median(a / b for a, b in zip(fsam, times[ref], strict=True))
    verdict = "met" if ratio <= limit else "MISSED"
    lines.append(
      f"F-SAM / {ref}: {ratio:.3f} (median of per-round ratios {paired:.3f}); "
      f"target <= {limit}: {verdict}"
    )
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=40)
  parser.add_argument("--steps-per-round", type=int, default=5)
  parser.add_argument("--smoke", action="store_true", help="a tiny MLP, two rounds")
  args = parser.parse_args()
  if args.smoke:
    models = [h.mlp(width=32, batch_size=8)]
    args.rounds, args.steps_per_round = 2, 1
  else:
    models = [h.mlp(), h.cnn()]

  print(h.header("Step time: F-SAM vs hand-written SAM vs optax.contrib.sam vs SGD"))
  print(
    f"base optimizer: sgd(lr={h.LEARNING_RATE}, momentum={h.MOMENTUM}); rho={h.RHO}, "
    f"sigma={h.SIGMA}, lmbda={h.LMBDA}; params and state donated in every variant\n"
  )
  for model in models:
    print(report(model, measure(model, args.rounds, args.steps_per_round)))
    print()
  print(f"load average (1/5/15 min) at end: {h.load_average()}")


if __name__ == "__main__":
  main()
