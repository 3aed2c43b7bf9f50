"""Step time of F-SAM against hand-written SAM, optax.contrib.sam and SGD.

F-SAM written out by hand in plain JAX runs beside them, to split F-SAM's
cost into the algorithm's (hand-written F-SAM over hand-written SAM) and the
library's (this package's F-SAM over the hand-written one).

Run: ``python benchmarks/step_time.py`` (about three minutes on two CPU cores;
time it on a quiet machine). The variants run interleaved in one process,
round-robin in a rotating order, with and without donating the params and
optimizer state; each sample is the mean of ``--steps-per-round`` steps and
the tables give medians over ``--rounds`` (at least 30) rounds.
``--smoke`` runs a tiny MLP for two rounds, to check the script.
``--family`` times GSAM, VaSSO and LookSAM (every 5) on the MLP instead,
against F-SAM and hand-written SAM, with LookSAM written out by hand beside
them to split its cost in the same way.
``--host`` times every-2 F-SAM and LookSAM (every 5) with the SAM-or-one-pass
choice made on the host (``fsam_optax.is_sam_step`` and a static ``sam_step``,
two compiled programs, the call and the dispatch inside the timed loop) beside
the same schedules chosen on the device, against every-step F-SAM and
hand-written SAM, on the MLP and the CNN; its samples are of 10 steps, so that
each holds the schedules' exact share of SAM steps.
"""

from __future__ import annotations

import argparse
import statistics

import _harness as h
import jax

TARGETS = (
  # (reference, largest allowed F-SAM / reference ratio of median step times)
  ("SAM (hand-written)", 1.10),
  ("SGD (one pass)", 2.15),
)
FAMILY_TARGETS = (
  # (method, reference, largest allowed ratio of median step times), with --family
  ("GSAM (fsam_optax)", "F-SAM (fsam_optax)", 1.05),
  ("VaSSO (fsam_optax)", "F-SAM (fsam_optax)", 1.05),
  ("LookSAM every 5 (fsam_optax)", "SAM (hand-written)", 0.65),
)
HOST_TARGETS = (
  # (host-chosen schedule, the same chosen on the device, reference, largest allowed
  # host / reference ratio of median step times), with --host
  ("F-SAM every 2nd step, host choice", "F-SAM every 2nd step", "F-SAM (fsam_optax)", 0.80),
  ("LookSAM every 5, host choice", "LookSAM every 5 (fsam_optax)", "SAM (hand-written)", 0.65),
)


def family_variants() -> dict:
  """The variants ``--family`` times: the references of FAMILY_TARGETS and the family."""
  names = ("F-SAM (fsam_optax)", "SAM (hand-written)", "SGD (one pass)")
  hand = {"LookSAM every 5 (hand-written)": h.hand_looksam_variant}
  return {**{name: h.VARIANTS[name] for name in names}, **h.FAMILY, **hand}


def host_variants() -> dict:
  """The variants ``--host`` times: HOST_TARGETS' schedules, both ways, their references and SGD."""
  names = ("F-SAM (fsam_optax)", "SAM (hand-written)", "SGD (one pass)")
  device = {
    "F-SAM every 2nd step": h.SCHEDULED["F-SAM every 2nd step"],
    "LookSAM every 5 (fsam_optax)": h.FAMILY["LookSAM every 5 (fsam_optax)"],
  }
  return {**{name: h.VARIANTS[name] for name in names}, **device, **h.HOST_CHOSEN}


def measure(
  model: h.Model,
  rounds: int,
  steps_per_round: int,
  variants: dict | None = None,
  warmup_steps: int = 1,
) -> dict[bool, dict[str, list[float]]]:
  """Samples of every variant, donated and not, all interleaved in one loop."""
  variants = h.VARIANTS if variants is None else variants
  params = model.init(jax.random.PRNGKey(0))
  batch = jax.device_put(h.make_batch(model))
  loss_fn = h.make_loss(model)
  runners = {}
  for donate in (True, False):
    for name, make in variants.items():
      own = jax.tree.map(lambda x: x.copy(), params)  # each variant donates its own copy
      runners[donate, name] = h.Runner.of(make(loss_fn), own, batch, donate)
      runners[donate, name].compile()  # a host choice's second program too, before timing
  times = h.interleaved(runners, rounds, steps_per_round, warmup_steps)
  return {d: {name: times[d, name] for name in variants} for d in (True, False)}


def target_line(
  name: str, ref: str, times: dict[str, list[float]], limit: float, mode: str, label: str = ""
) -> str:
  """The ratio of ``name``'s median step time to ``ref``'s, against its target.

  ``label`` names ``name`` in the line (``name`` itself by default).
  """
  ratio = statistics.median(times[name]) / statistics.median(times[ref])
  # The per-round ratio pairs samples taken seconds apart, so a load burst
  # from another job moves numerator and denominator together.
  paired = statistics.median(a / b for a, b in zip(times[name], times[ref], strict=True))
  verdict = "met" if ratio <= limit else "MISSED"
  return (
    f"{label or name} / {ref} ({mode}): {ratio:.3f} (median of per-round ratios {paired:.3f}); "
    f"target <= {limit}: {verdict}"
  )


def timing_table(title: str, times: dict[str, list[float]], refs: dict[str, str]) -> list[str]:
  """A report's heading and table: each variant's median, spread and ratios to ``refs``.

  ``refs`` maps a column's heading to the variant it divides by.
  """
  med = {name: statistics.median(t) for name, t in times.items()}
  rows = [
    [name, f"{h.summary(samples)[0]:.2f}", h.summary(samples)[1]]
    + [f"{med[name] / med[ref]:.3f}" for ref in refs.values()]
    for name, samples in times.items()
  ]
  return [
    f"## {title}",
    f"{len(times['SGD (one pass)'])} interleaved rounds; ms per step",
    "",
    h.table(rows, ["variant", "median", "min-max", *refs]),
    "",
  ]


def report(model: h.Model, times: dict[str, list[float]], donate: bool) -> str:
  params = model.init(jax.random.PRNGKey(0))
  med = {name: statistics.median(t) for name, t in times.items()}
  mode = "params and state donated" if donate else "no donation"
  title = f"{model.name}: {h.param_count(params):,} parameters, batch {model.batch_size}; {mode}"
  refs = {"x hand SAM": "SAM (hand-written)", "x SGD": "SGD (one pass)"}
  lines = timing_table(title, times, refs)
  for ref, limit in TARGETS:
    lines.append(target_line("F-SAM (fsam_optax)", ref, times, limit, mode, label="F-SAM"))
  hand = med["F-SAM (hand-written)"]
  lines.append(
    f"F-SAM / F-SAM (hand-written) ({mode}): {med['F-SAM (fsam_optax)'] / hand:.3f}, the "
    f"library's own cost; F-SAM (hand-written) / SAM (hand-written): "
    f"{hand / med['SAM (hand-written)']:.3f}, the algorithm's"
  )
  return "\n".join(lines)


def family_report(model: h.Model, times: dict[str, list[float]], donate: bool) -> str:
  med = {name: statistics.median(t) for name, t in times.items()}
  mode = "params and state donated" if donate else "no donation"
  refs = {"x hand SAM": "SAM (hand-written)"}
  lines = timing_table(f"{model.name}, the SAM family; {mode}", times, refs)
  for name, ref, limit in FAMILY_TARGETS:
    lines.append(target_line(name, ref, times, limit, mode))
  hand = med["LookSAM every 5 (hand-written)"]
  lines.append(
    f"LookSAM / LookSAM (hand-written) ({mode}): {med['LookSAM every 5 (fsam_optax)'] / hand:.3f}, "
    f"the library's own cost; LookSAM (hand-written) / SAM (hand-written): "
    f"{hand / med['SAM (hand-written)']:.3f}, the algorithm's"
  )
  return "\n".join(lines)


def host_report(model: h.Model, times: dict[str, list[float]], donate: bool) -> str:
  """HOST_TARGETS' verdicts, each with the same schedule chosen on the device beside it."""
  med = {name: statistics.median(t) for name, t in times.items()}
  mode = "params and state donated" if donate else "no donation"
  title = f"{model.name}, the SAM-or-one-pass choice on the host and on the device; {mode}"
  refs = {"x F-SAM": "F-SAM (fsam_optax)", "x hand SAM": "SAM (hand-written)"}
  lines = timing_table(title, times, refs)
  for host, device, ref, limit in HOST_TARGETS:
    lines.append(
      f"{target_line(host, ref, times, limit, mode)}; chosen on the device ({device}): "
      f"{med[device] / med[ref]:.3f}"
    )
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--rounds", type=int, default=100, help="interleaved rounds, at least 30 (default 100)"
  )
  parser.add_argument(
    "--steps-per-round",
    type=int,
    help=f"steps averaged per sample (default 5; with --host {h.SCHEDULE_PERIOD}, and a "
    f"multiple of {h.SCHEDULE_PERIOD}, so that every sample holds the schedules' share of SAM "
    "steps)",
  )
  parser.add_argument("--mlp-only", action="store_true", help="skip the small CNN")
  parser.add_argument("--smoke", action="store_true", help="a tiny MLP, two rounds")
  modes = parser.add_mutually_exclusive_group()
  modes.add_argument(
    "--family", action="store_true", help="GSAM, VaSSO, LookSAM against F-SAM and SAM (MLP)"
  )
  modes.add_argument(
    "--host",
    action="store_true",
    help="every-2 F-SAM and LookSAM every 5, chosen on the host and on the device",
  )
  args = parser.parse_args()
  period = h.SCHEDULE_PERIOD if args.host else 1
  if args.steps_per_round is None:
    args.steps_per_round = h.SCHEDULE_PERIOD if args.host else 5
  if args.steps_per_round < 1 or args.steps_per_round % period:
    parser.error(f"--steps-per-round must be a positive multiple of {period}")
  if args.smoke:
    models = [h.mlp(width=32, batch_size=8)]
    args.rounds, args.steps_per_round = 2, period
  else:
    if args.rounds < 30:
      parser.error("--rounds must be at least 30: the medians are reported against targets")
    models = [h.mlp()] if args.mlp_only else [h.mlp(), h.cnn()]

  if args.family:
    print(h.header("Step time: GSAM, VaSSO, LookSAM vs F-SAM and hand-written SAM"))
    model = models[0]
    times = measure(model, args.rounds, args.steps_per_round, family_variants())
    for donate in (True, False):
      print(family_report(model, times[donate], donate))
      print()
    print(f"load average (1/5/15 min) at end: {h.load_average()}")
    return
  if args.host:
    print(h.header("Step time: the SAM-or-one-pass choice on the host vs on the device"))
    for model in models:
      times = measure(model, args.rounds, args.steps_per_round, host_variants(), h.SCHEDULE_PERIOD)
      for donate in (True, False):
        print(host_report(model, times[donate], donate))
        print()
    print(f"load average (1/5/15 min) at end: {h.load_average()}")
    return
  print(h.header("Step time: F-SAM vs hand-written SAM vs optax.contrib.sam vs SGD"))
  print(
    f"base optimizer: sgd(lr={h.LEARNING_RATE}, momentum={h.MOMENTUM}); rho={h.RHO}, "
    f"sigma={h.SIGMA}, lmbda={h.LMBDA}; every variant with and without donation, all interleaved\n"
  )
  for model in models:
    times = measure(model, args.rounds, args.steps_per_round)
    for donate in (True, False):
      print(report(model, times[donate], donate))
      print()
  print(f"load average (1/5/15 min) at end: {h.load_average()}")


if __name__ == "__main__":
  main()
