"""The benchmark scripts still run: each JAX-only script in its ``--smoke`` mode.

``benchmarks/torch_compare.py`` needs PyTorch, which is not a test
dependency, and is not run here; ``benchmarks/resnet18.py`` runs at its tiny
smoke size, which still compiles ResNet-18's seven steps on the CPU.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize(
  ("command", "verdicts"),
  [
    (("step_time.py",), 4),
    (("step_time.py", "--host"), 4),
    (("memory.py",), 1),
    (("compile_time.py",), 1),
    (("traffic.py",), 2),
  ],
  ids=["step_time", "step_time-host", "memory", "compile_time", "traffic"],
)
def test_smoke_run_prints_a_verdict_per_target(command: tuple[str, ...], verdicts: int) -> None:
  script, *options = command
  result = subprocess.run(
    [sys.executable, str(BENCHMARKS / script), *options, "--smoke"],
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert result.returncode == 0, result.stderr
  assert result.stdout.count("target <=") == verdicts, result.stdout
  assert "machine:" in result.stdout


def test_resnet18_smoke_run_prints_every_ratio_and_the_compile_time() -> None:
  pytest.importorskip("flax")
  result = subprocess.run(
    [sys.executable, str(BENCHMARKS / "resnet18.py"), "--smoke"],
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert result.returncode == 0, result.stderr
  assert result.stdout.count(" step time: ") == 6, result.stdout
  assert result.stdout.count("target <=") == 3, result.stdout
  for line in ("device: cpu", "flax ", "compile: ", "LookSAM every 5, host choice"):
    assert line in result.stdout, line


def test_host_choice_takes_the_steps_of_the_device_choice(
  monkeypatch: pytest.MonkeyPatch,
) -> None:
  # step_time.py --host compares each schedule chosen on the host with the same
  # schedule chosen on the device; that comparison means something only if
  # the runner's own count of updates gives both the same steps.
  monkeypatch.syspath_prepend(str(BENCHMARKS))
  import _harness as h

  twins = {
    "F-SAM every 2nd step, host choice": h.SCHEDULED["F-SAM every 2nd step"],
    "LookSAM every 5, host choice": h.FAMILY["LookSAM every 5 (fsam_optax)"],
  }
  assert sorted(twins) == sorted(h.HOST_CHOSEN)
  with jax.enable_x64(True), jax.numpy_rank_promotion("allow"):
    model = h.mlp(width=16, batch_size=8)
    loss_fn = h.make_loss(model)
    params = model.init(jax.random.PRNGKey(0))
    x, y = h.make_batch(model)
    batch = (jnp.asarray(x, jnp.float64), jnp.asarray(y))
    for name, device in twins.items():
      runs = []
      for variant in (h.HOST_CHOSEN[name](loss_fn), device(loss_fn)):
        runner = h.Runner.of(variant, jax.tree.map(jnp.copy, params), batch)
        runner(7)  # SAM and one-pass steps of both schedules
        runs.append(runner.params)
      gaps = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), *runs)
      moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), runs[0], params)
      assert min(jax.tree.leaves(moved)) > 1e-6, name  # the steps did something
      assert max(jax.tree.leaves(gaps)) < 1e-12, (name, gaps)


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


def test_hand_written_fsam_takes_the_same_steps_as_the_library(
  monkeypatch: pytest.MonkeyPatch,
) -> None:
  # The step-time benchmark splits F-SAM's cost into the algorithm's and the
  # library's with a hand-written F-SAM; that split means something only if
  # both compute the same training steps.
  monkeypatch.syspath_prepend(str(BENCHMARKS))
  import _harness as h

  # The harness's models broadcast biases by rank promotion, as user code does.
  with jax.enable_x64(True), jax.numpy_rank_promotion("allow"):
    model = h.mlp(width=16, batch_size=8)
    loss_fn = h.make_loss(model)
    params = model.init(jax.random.PRNGKey(0))
    assert jax.tree.leaves(params)[0].dtype == jnp.float64
    x, y = h.make_batch(model)
    batch = (jnp.asarray(x, jnp.float64), jnp.asarray(y))
    runs = []
    for make in (h.fsam_variant, h.hand_fsam_variant):
      variant = make(loss_fn)
      step = jax.jit(variant.step)
      p, state = params, variant.init(params)
      for _ in range(4):
        p, state, _ = step(p, state, batch)
      runs.append(p)
    library, hand = runs
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), library, params)
    assert min(jax.tree.leaves(moved)) > 1e-6  # the steps did something
    gaps = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), library, hand)
    assert max(jax.tree.leaves(gaps)) < 1e-12, gaps


def test_fsam_costs_a_train_step_at_most_two_lines_in_each_framework() -> None:
  """NNX, Equinox and Linen steps, each run: F-SAM's is at most 2 lines longer than SGD's."""
  pytest.importorskip("flax")
  pytest.importorskip("equinox")
  result = subprocess.run(
    [sys.executable, str(BENCHMARKS / "step_lines.py")],
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert result.returncode == 0, result.stderr
  rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()[1:]}
  assert sorted(rows) == ["equinox", "linen", "nnx"], result.stdout
  for sgd, fsam, more in rows.values():
    assert int(fsam) - int(sgd) == int(more) <= 2, result.stdout
