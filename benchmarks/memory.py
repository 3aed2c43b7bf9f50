"""Memory of a jitted F-SAM step and of its optimizer state, against SAM and SGD.

Run: ``python benchmarks/memory.py`` (seconds; it compiles, it does not train).
The step figures are XLA's compiled memory analysis of each donated step
(the opt-in cheaper schedules of F-SAM included);
the state figures count the bytes of the optimizer state's arrays.
"""

from __future__ import annotations

import argparse

import _harness as h
import jax
import optax

import fsam_optax


def live_bound(stats: object) -> int:
  """Arguments + outputs - aliased + temporaries: every buffer live at once.

  XLA's own ``peak_memory_in_bytes`` is shown beside it; on the CPU backend it
  leaves the temporaries out, so the bound is the figure compared.
  """
  return (
    stats.argument_size_in_bytes
    + stats.output_size_in_bytes
    - stats.alias_size_in_bytes
    + stats.temp_size_in_bytes
  )


# "One parameter-size above" allows the F-SAM state's scalars (count, rho,
# sigma, eps) on top of the moving average.
SCALAR_SLACK_BYTES = 64


def step_memory(model: h.Model) -> str:
  params = model.init(jax.random.PRNGKey(0))
  batch = jax.device_put(h.make_batch(model))
  loss_fn = h.make_loss(model)
  unit = h.tree_bytes(params)
  stats = {}
  for name, make in {**h.VARIANTS, **h.SCHEDULED}.items():
    variant = make(loss_fn)
    compiled = h.jit_step(variant.step).lower(params, variant.init(params), batch).compile()
    stats[name] = compiled.memory_analysis()
  ref = stats["SAM (hand-written)"]
  mib = lambda b: f"{b / 2**20:.2f}"
  rows = [
    [
      name,
      mib(s.argument_size_in_bytes),
      mib(s.output_size_in_bytes),
      mib(s.alias_size_in_bytes),
      mib(s.temp_size_in_bytes),
      mib(getattr(s, "peak_memory_in_bytes", 0)),
      mib(live_bound(s)),
      f"{(live_bound(s) - live_bound(ref)) / unit:+.2f}",
      f"{(s.temp_size_in_bytes - ref.temp_size_in_bytes) / unit:+.2f}",
    ]
    for name, s in stats.items()
  ]
  extra = live_bound(stats["F-SAM (fsam_optax)"]) - live_bound(ref)
  verdict = "met" if extra <= unit + SCALAR_SLACK_BYTES else "MISSED"
  return "\n".join(
    [
      f"## {model.name}: {h.param_count(params):,} parameters "
      f"(one parameter-size = {mib(unit)} MiB), batch {model.batch_size}",
      "MiB; the last two columns in parameter-sizes, relative to the hand-written SAM step",
      "",
      h.table(
        rows,
        [
          "variant",
          "arguments",
          "outputs",
          "aliased",
          "temp",
          "XLA peak",
          "live bound",
          "bound vs SAM",
          "temp vs SAM",
        ],
      ),
      "",
      f"F-SAM live bound - hand-written SAM live bound: {extra / unit:+.4f} parameter-sizes "
      f"({extra:,} bytes); target <= +1 (plus scalars): {verdict}",
    ]
  )


def state_memory(model: h.Model) -> str:
  params = model.init(jax.random.PRNGKey(0))
  unit = h.tree_bytes(params)
  base = h.base_optimizer()
  optimizers = {
    "fsam_optax.fsam + sgd(momentum)": optax.chain(
      fsam_optax.fsam(rho=h.RHO, sigma=h.SIGMA, lmbda=h.LMBDA), base
    ),
    "fsam_optax.sam + sgd(momentum)": optax.chain(fsam_optax.sam(rho=h.RHO), base),
    "sgd(momentum) alone": base,
  }
  base_bytes = h.tree_bytes(base.init(params))
  rows = []
  for name, tx in optimizers.items():
    state = tx.init(params)
    extra = h.tree_bytes(state) - base_bytes
    rows.append(
      [
        name,
        str(len(jax.tree.leaves(state))),
        f"{h.tree_bytes(state):,}",
        f"{extra:,}",
        f"{extra / unit:.6f}",
      ]
    )
  return "\n".join(
    [
      f"## Optimizer state, {model.name} (parameters: {unit:,} bytes)",
      "",
      h.table(
        rows,
        ["optimizer", "arrays", "bytes", "bytes over sgd", "over sgd, parameter-sizes"],
      ),
    ]
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true", help="a tiny MLP")
  args = parser.parse_args()
  if args.smoke:
    models = [h.mlp(width=32, batch_size=8)]
  else:
    models = [h.mlp(), h.cnn()]
  print(h.header("Memory: compiled step and optimizer state"))
  print("every step donates its params and optimizer state\n")
  for model in models:
    print(step_memory(model))
    print()
  print(state_memory(models[0]))


if __name__ == "__main__":
  main()
