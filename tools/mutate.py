"""Mutation testing of the core update: do the property tests alone catch wrong F-SAM maths?

Each mutant replaces one exact piece of source in ``fsam_optax/`` with a plausible mistake
(the moving average fed the direction, a per-tensor norm, no ``eps``, a flipped sign, ...).
For each, the package is copied to a temporary folder, the mutant applied there, and only
``tests/test_properties.py`` (and the reference test of the multi-output-fusion layout)
runs against it. A mutant is *killed* when a test fails.

A mutant whose source snippet is not found (or found more than once) is an error, not a
survivor: after the code changes, update the snippet here. Run from the repository root::

  python tools/mutate.py            # every mutant, 2 at a time
  python tools/mutate.py -j 1 -k eps

Exit status 0 when at least ``--min-killed`` (default 80%) of the mutants are killed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

ROOT = pathlib.Path(__file__).resolve().parents[1]
FSAM = "fsam_optax/_fsam.py"
PERTURB = "fsam_optax/_value_and_grad.py"
PRECISION = "fsam_optax/_precision.py"
SCHEDULE = "fsam_optax/_schedule.py"
TESTS = [
  "tests/test_properties.py",
  # The layout traced where XLA has multi-output fusion, which the CPU does not use by default.
  "tests/test_traffic.py::test_the_multi_output_fusion_layout_equals_the_reference",
]


class Mutant(NamedTuple):
  name: str
  path: str
  find: str
  replace: str


def directions(d: str, e: str = "d_leaves") -> str:
  """perturb's direction: ``d`` for the norm, ``e`` for the step.

  On XLA:CPU's default flags the step reuses the norm's list (``e_dirs = d_leaves``), so a
  mistake in ``d`` reaches both; ``e`` names a different expression for the step alone.
  """
  tail = " for g, m in zip(g_leaves, ema, strict=True)]"
  step = e if e == "d_leaves" else f"[{e}{tail}"
  return f"    d_leaves = [{d}{tail}\n    e_dirs = {step}\n"


D = "(g - sigma * m).astype(g.dtype)"
BOTH = directions(D)

MUTANTS = [
  # The moving average, fsam's update.
  Mutant(
    "EMA fed the direction d instead of the raw g",
    FSAM,
    "(a * m + (1 - a) * g).astype(m.dtype)",
    "(a * m + (1 - a) * (g - state.sigma * m)).astype(m.dtype)",
  ),
  Mutant(
    "lambda and 1 - lambda swapped",
    FSAM,
    "(a * m + (1 - a) * g).astype(m.dtype)",
    "((1 - a) * m + a * g).astype(m.dtype)",
  ),
  Mutant(
    "EMA not cast back to its dtype",
    FSAM,
    "(a * m + (1 - a) * g).astype(m.dtype)",
    "(a * m + (1 - a) * g)",
  ),
  Mutant(
    "first step decays from m = 0 (the paper's form)",
    FSAM,
    "decay = jnp.where(state.count == 0, 0.0, lmbda)",
    "decay = jnp.where(state.count == 0, lmbda, lmbda)",
  ),
  Mutant(
    "first-step rule on the wrong step",
    FSAM,
    "decay = jnp.where(state.count == 0, 0.0, lmbda)",
    "decay = jnp.where(state.count == 1, 0.0, lmbda)",
  ),
  Mutant(
    "count not incremented",
    FSAM,
    "count = optax.safe_increment(state.count)",
    "count = state.count",
  ),
  Mutant(
    "EMA of bfloat16/float16 params kept in their dtype, not float32",
    FSAM,
    "jnp.finfo(dtype).bits < 32",
    "jnp.finfo(dtype).bits < 16",
  ),
  Mutant(
    "ema_dtype ignored",
    FSAM,
    "dtype = ema_dtype or param.dtype",
    "dtype = param.dtype",
  ),
  Mutant(
    "non-finite guard inverted (finite steps leave the state unchanged)",
    FSAM,
    "jax.lax.cond(finite, advance, lambda: state)",
    "jax.lax.cond(finite, lambda: state, advance)",
  ),
  # Which steps take the SAM step.
  Mutant(
    "every=k takes steps 1, k + 1, ... instead of 0, k, ...",
    SCHEDULE,
    "return count % every == 0",
    "return count % every == 1",
  ),
  Mutant(
    "probability draw compared the wrong way",
    SCHEDULE,
    "return jax.random.uniform(key, dtype=jnp.float32) < probability",
    "return jax.random.uniform(key, dtype=jnp.float32) >= probability",
  ),
  # The direction and the perturbation, the gradient function's perturb.
  Mutant(
    "direction adds the average (sign flip)",
    PERTURB,
    BOTH,
    directions("(g + sigma * m).astype(g.dtype)"),
  ),
  Mutant(
    "sigma ignored",
    PERTURB,
    BOTH,
    directions("(g - m).astype(g.dtype)"),
  ),
  Mutant(
    "direction from the current gradient instead of the old average",
    PERTURB,
    BOTH,
    directions("(g - sigma * g).astype(g.dtype)"),
  ),
  Mutant(
    "norm of g instead of the direction d",
    PERTURB,
    BOTH,
    directions("g", D),
  ),
  Mutant(
    "step along g + sigma m while the norm is of d",
    PERTURB,
    BOTH,
    directions(D, "(g + sigma * m).astype(g.dtype)"),
  ),
  Mutant(
    "multi-output-fusion spelling of the step direction adds sigma m",
    PERTURB,
    "      e_dirs = [(g + (-sigma) * m).astype(g.dtype)",
    "      e_dirs = [(g + sigma * m).astype(g.dtype)",
  ),
  Mutant(
    "perturbation subtracted (descent instead of ascent)",
    PERTURB,
    "p if e is None else p + e",
    "p if e is None else p - e",
  ),
  Mutant(
    "no eps in the division",
    PERTURB,
    "scale = rho.astype(acc) / (norm + eps.astype(acc))",
    "scale = rho.astype(acc) / norm",
  ),
  Mutant(
    "rho scaled twice",
    PERTURB,
    "scale = rho.astype(acc) / (norm + eps.astype(acc))",
    "scale = 2 * rho.astype(acc) / (norm + eps.astype(acc))",
  ),
  Mutant(
    "squared norm instead of the norm",
    PERTURB,
    "norm = jnp.sqrt(total(sq).astype(acc))",
    "norm = total(sq).astype(acc)",
  ),
  Mutant(
    "norm of the first leaf only (the squared sums not added)",
    PERTURB,
    "return sum(kept[1:], kept[0]) if kept else jnp.zeros([])",
    "return kept[0] if kept else jnp.zeros([])",
  ),
  Mutant(
    "per-tensor norm instead of one global norm",
    PERTURB,
    "(scale * weighted(p, d, 2)).astype(p.dtype) if keep else None",
    "(rho.astype(acc) / (jnp.sqrt(jnp.sum(jnp.square(weighted(p, d, 1))))"
    " + eps.astype(acc)) * weighted(p, d, 2)).astype(p.dtype) if keep else None",
  ),
  Mutant(
    "adaptive perturbation with |theta| instead of theta^2",
    PERTURB,
    "(scale * weighted(p, d, 2)).astype(p.dtype) if keep else None",
    "(scale * weighted(p, d, 1)).astype(p.dtype) if keep else None",
  ),
  Mutant(
    "adaptive norm of theta^2 d instead of |theta| d",
    PERTURB,
    "jnp.sum(jnp.square(weighted(p, d, 1)))",
    "jnp.sum(jnp.square(weighted(p, d, 2)))",
  ),
  Mutant(
    "adaptive mode ignored",
    PERTURB,
    "return jnp.abs(p).astype(acc) ** power * d if adaptive else d",
    "return d",
  ),
  Mutant(
    "perturbation not cast to the params' dtype",
    PERTURB,
    "(scale * weighted(p, d, 2)).astype(p.dtype) if keep else None",
    "(scale * weighted(p, d, 2)) if keep else None",
  ),
  Mutant(
    "clean gradient's ordering tie always selects zeros",
    PERTURB,
    "never = jnp.isfinite(first) & jnp.isnan(first)",
    "never = jnp.isfinite(first) | jnp.isnan(first)",
  ),
  Mutant(
    "products in the params' dtype, not at least float32",
    PRECISION,
    "return jnp.result_type(jnp.float32, *(x.dtype for x in leaves))",
    "return jnp.result_type(jnp.float16, *(x.dtype for x in leaves))",
  ),
]


def mutated(mutant: Mutant, source: str) -> str:
  """``source`` with ``mutant`` applied; its snippet must occur exactly once."""
  count = source.count(mutant.find)
  if count != 1:
    raise SystemExit(
      f"mutant {mutant.name!r}: its snippet occurs {count} times in {mutant.path} (expected "
      f"once); update tools/mutate.py to the current source:\n  {mutant.find}"
    )
  return source.replace(mutant.find, mutant.replace)


def run(mutant: Mutant | None) -> tuple[bool, float]:
  """Runs the property tests against a mutated copy; returns (tests passed, seconds)."""
  with tempfile.TemporaryDirectory(prefix="fsam-mutant-") as tmp:
    root = pathlib.Path(tmp)
    for name in ("fsam_optax", "tests"):
      shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("conftest.py", "pyproject.toml"):
      shutil.copy(ROOT / name, root / name)
    if mutant is not None:
      path = root / mutant.path
      path.write_text(mutated(mutant, path.read_text()))
    start = time.perf_counter()
    result = subprocess.run(
      [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *TESTS],
      cwd=root,
      env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
      capture_output=True,
      text=True,
    )
    return result.returncode == 0, time.perf_counter() - start


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("-j", "--jobs", type=int, default=2, help="mutants run at once")
  parser.add_argument("-k", default="", help="only mutants whose name contains this")
  parser.add_argument("--min-killed", type=float, default=0.8, help="fraction to pass")
  args = parser.parse_args()
  mutants = [m for m in MUTANTS if args.k in m.name]
  for m in mutants:  # every snippet is checked before anything runs
    mutated(m, (ROOT / m.path).read_text())
  passed, seconds = run(None)
  if not passed:
    print("the property tests fail on the unmutated code; fix that first")
    return 1
  print(f"unmutated code: property tests pass ({seconds:.0f} s)")
  killed = 0
  with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
    for m, (survived, seconds) in zip(mutants, pool.map(run, mutants), strict=True):
      killed += not survived
      print(f"{'SURVIVED' if survived else 'killed  '}  {seconds:5.0f} s  {m.path}: {m.name}")
  print(f"\n{killed} of {len(mutants)} mutants killed by {' '.join(TESTS)} alone")
  return 0 if killed >= args.min_killed * len(mutants) else 1


if __name__ == "__main__":
  sys.exit(main())
