"""The benchmark scripts still run: each JAX-only script in its ``--smoke`` mode.

``benchmarks/torch_compare.py`` needs PyTorch, which is not a test
dependency, and ``benchmarks/resnet18.py`` takes minutes to compile on a CPU;
neither is run here.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize(
  ("script", "verdicts"),
  [("step_time.py", 4), ("memory.py", 1), ("compile_time.py", 1), ("traffic.py", 2)],
)
def test_smoke_run_prints_a_verdict_per_target(script: str, verdicts: int) -> None:
  result = subprocess.run(
    [sys.executable, str(BENCHMARKS / script), "--smoke"],
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert result.returncode == 0, result.stderr
  assert result.stdout.count("target <=") == verdicts, result.stdout
  assert "machine:" in result.stdout


def test_schedule_tradeoff_smoke_run_prints_both_verdicts() -> None:
  pytest.importorskip("flax")
  pytest.importorskip("sklearn")
  result = subprocess.run(
    [
      sys.executable,
      str(BENCHMARKS / "schedule_tradeoff.py"),
      *("--rho", "0.1", "--quick", "--seeds", "2", "--epochs", "1"),
    ],
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert result.returncode == 0, result.stderr
  assert result.stdout.count("target") == 2, result.stdout
  assert "95% t-interval" in result.stdout
