"""The family's cost benchmarks run, and GSAM and VaSSO stay at F-SAM's memory traffic.

The byte counts are XLA's compile-time cost analysis of
``benchmarks/traffic.py --family`` (MLP 784-1024-1024-10, batch 256), guarded
at the versions CI installs (the minimum-versions job skips them).
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
MULTI_OUTPUT_FUSION = "--xla_backend_extra_options=xla_cpu_use_multi_output_fusion"
min_versions = pytest.mark.skipif(
  os.environ.get("FSAM_MIN_VERSIONS") == "1",
  reason="byte counts depend on the jaxlib version; guarded at the versions CI installs",
)


def run(script: str, *args: str, xla_flags: str = "") -> str:
  env = {**os.environ, "XLA_FLAGS": xla_flags}
  result = subprocess.run(
    [sys.executable, str(BENCHMARKS / script), *args],
    capture_output=True,
    text=True,
    env=env,
    timeout=600,
    check=False,
  )
  assert result.returncode == 0, result.stderr
  return result.stdout


def over_sam(stdout: str, method: str) -> list[float]:
  """``method``'s bytes accessed - hand-written SAM, without and with donation."""
  pattern = rf"{method} bytes accessed - hand-written SAM: ([+-][\d.]+) parameter-sizes"
  found = [float(x) for x in re.findall(pattern, stdout)]
  assert len(found) == 2, stdout
  return found


@min_versions
@pytest.mark.parametrize("xla_flags", ["", MULTI_OUTPUT_FUSION], ids=["default", "fusion"])
def test_gsam_and_vasso_read_and_write_three_parameter_sizes_more_than_sam(xla_flags):
  # GSAM: g and g' read once more for <g, g'> and ||g'|| (one reduction), g
  # once more for g' - alpha v, fused into the base optimizer. VaSSO: its new
  # average is computed once, stored, and read by the norm and by theta + e.
  # Measured +3.00 for both, with and without donation and fusion.
  stdout = run("traffic.py", "--family", xla_flags=xla_flags)
  for method in ("GSAM", "VaSSO"):
    assert all(extra <= 3.05 for extra in over_sam(stdout, method)), method
  # The whole run, not a smoke one: it also prints a verdict per target.
  assert stdout.count("target <=") == 6, stdout
  assert "LookSAM every 5" in stdout


def test_family_step_time_smoke_run_prints_a_verdict_per_target():
  stdout = run("step_time.py", "--family", "--smoke")
  assert stdout.count("target <=") == 6, stdout
  assert "LookSAM every 5" in stdout
  # With and without donation.
  assert stdout.count("LookSAM / LookSAM (hand-written)") == 2, stdout


def test_hand_written_looksam_takes_the_library_steps(monkeypatch: pytest.MonkeyPatch) -> None:
  # step_time.py --family splits LookSAM's cost with a hand-written LookSAM;
  # that split means something only if both compute the same training steps.
  monkeypatch.syspath_prepend(str(BENCHMARKS))
  import _harness as h
  import jax
  import jax.numpy as jnp

  with jax.enable_x64(True), jax.numpy_rank_promotion("allow"):
    model = h.mlp(width=16, batch_size=8)
    loss_fn = h.make_loss(model)
    params = model.init(jax.random.PRNGKey(0))
    x, y = h.make_batch(model)
    batch = (jnp.asarray(x, jnp.float64), jnp.asarray(y))
    library = h.FAMILY["LookSAM every 5 (fsam_optax)"](loss_fn)
    runs = []
    for variant in (library, h.hand_looksam_variant(loss_fn)):
      step = jax.jit(variant.step)
      p, state = params, variant.init(params)
      for _ in range(7):  # SAM steps 0 and 5, reused steps between
        p, state, _ = step(p, state, batch)
      runs.append(p)
    gaps = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), *runs)
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), runs[0], params)
    assert min(jax.tree.leaves(moved)) > 1e-6  # the steps did something
    assert max(jax.tree.leaves(gaps)) < 1e-12, gaps
