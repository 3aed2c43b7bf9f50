"""examples/fashion_mnist.py with GSAM, VaSSO and LookSAM: tuning order, smoke study, resuming."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from tests.examples_loader import load_example
from tests.test_fashion_mnist import ScoredStudy

pytest.importorskip("flax")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

fm = load_example("fashion_mnist")
FAMILY = ("gsam", "vasso", "looksam", "wsam")


def test_the_plain_command_runs_the_whole_family() -> None:
  assert fm.parse_args([]).methods == ["sgd", "sam", "fsam", "gsam", "vasso", "looksam", "wsam"]
  for name in FAMILY:
    m = fm.METHODS[name]
    assert (m.start_from, m.compare_to) == ("sam", ("sam", "sgd"))
    assert [g.name for g in m.tuned][1] == "rho"  # rho second, around SAM's
  # LookSAM's k is static: a Python int, never traced.
  assert fm.METHODS["looksam"].fixed == {"every": 5}
  assert isinstance(fm.METHODS["looksam"].fixed["every"], int)


def test_each_method_tunes_its_own_value_at_sams_rho_then_rho() -> None:
  # SAM peaks at rho 0.2; GSAM's alpha at 0.6 (widened up from 0.4) and its rho at 0.4;
  # VaSSO's theta at 0.2 (inside) and rho 0.2; LookSAM's alpha at 0 (widened down).
  def score(method, hp):
    rho = -abs(np.log2(hp["rho"] / 0.2))
    if method == "gsam":
      return -abs(hp["alpha"] - 0.6) - abs(np.log2(hp["rho"] / 0.4))
    if method == "vasso":
      return -abs(hp["theta"] - 0.2) + rho
    if method == "looksam":
      return -hp["alpha"] + rho
    return rho

  study = ScoredStudy(score)
  assert study.choose("gsam", 0.4) == {"rho": 0.4, "alpha": 0.6}
  gsam = [(hp["alpha"], hp["rho"]) for m, hp in study.calls if m == "gsam"]
  assert gsam == [
    *[(0.1, 0.2), (0.2, 0.2), (0.4, 0.2), (0.6, 0.2), (0.8, 0.2)],  # alpha, widened up
    *[(0.6, 0.1), (0.6, 0.4), (0.6, 0.8)],  # rho around SAM's, widened up
  ]
  assert study.choose("vasso", 0.4) == {"rho": 0.2, "theta": 0.2}
  vasso = [(hp["theta"], hp["rho"]) for m, hp in study.calls if m == "vasso"]
  assert vasso == [(0.2, 0.2), (0.4, 0.2), (0.9, 0.2), (0.1, 0.2), (0.2, 0.1), (0.2, 0.4)]
  assert study.choose("looksam", 0.4) == {"rho": 0.2, "every": 5, "alpha": 0.0}
  looksam = [(hp["alpha"], hp["rho"]) for m, hp in study.calls if m == "looksam"]
  assert looksam == [(0.1, 0.2), (0.4, 0.2), (0.7, 0.2), (0.0, 0.2), (0.0, 0.1), (0.0, 0.4)]
  assert all(hp["every"] == 5 for m, hp in study.calls if m == "looksam")


def test_one_compile_per_method_across_hyperparameters() -> None:
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, 196)).astype(np.float32)
  y = rng.integers(0, 10, 64).astype(np.int32)
  data = fm.Data(x, y, x, y, x, y)
  settings = fm.Settings(hidden=(8,), batch_size=16, epochs=2)
  grids = {
    "gsam": [{"rho": 0.1, "alpha": 0.1}, {"rho": 0.2, "alpha": 0.4}],
    "vasso": [{"rho": 0.1, "theta": 0.2}, {"rho": 0.2, "theta": 0.9}],
    "looksam": [{"rho": 0.1, "every": 5, "alpha": 0.1}, {"rho": 0.2, "every": 5, "alpha": 0.7}],
  }
  for method, hps in grids.items():
    trainer = fm.Trainer(method, settings, data)
    finals = []
    for hp in hps:
      curves = trainer.run(0.4, 1, hp, lambda: None)
      assert all(np.isfinite(curves["loss"]))
      finals.append(curves["loss"][-1])
    assert trainer.epoch._cache_size() == 1, method
    assert finals[0] != finals[1], method  # the traced values do reach the step


def test_limiting_cases_match_sam_in_the_study(monkeypatch: pytest.MonkeyPatch) -> None:
  # GSAM alpha 0, VaSSO theta 1 and LookSAM every 1 are SAM: the same first epoch.
  rng = np.random.default_rng(1)
  x = rng.normal(size=(64, 196)).astype(np.float32)
  y = rng.integers(0, 10, 64).astype(np.int32)
  data = fm.Data(x, y, x, y, x, y)
  settings = fm.Settings(hidden=(8,), batch_size=16, epochs=1)
  sam = fm.Trainer("sam", settings, data).run(0.4, 1, {"rho": 0.1}, lambda: None)
  cases = {"gsam": {"rho": 0.1, "alpha": 0.0}, "vasso": {"rho": 0.1, "theta": 1.0}}
  for method, hp in cases.items():
    curves = fm.Trainer(method, settings, data).run(0.4, 1, hp, lambda: None)
    np.testing.assert_allclose(curves["loss"], sam["loss"], rtol=1e-5, err_msg=method)
  every1 = fm.Method(
    "LookSAM k=1", front=lambda hp: fm.fsam_optax.looksam(hp["rho"], every=1, alpha=hp["alpha"])
  )
  monkeypatch.setitem(fm.METHODS, "looksam_every1", every1)
  trainer = fm.Trainer("looksam_every1", settings, data)
  curves = trainer.run(0.4, 1, {"rho": 0.1, "alpha": 0.7}, lambda: None)
  np.testing.assert_allclose(curves["loss"], sam["loss"], rtol=1e-5)


def test_adding_methods_resumes_and_other_settings_are_still_refused(
  tmp_path: pathlib.Path,
) -> None:
  out = tmp_path / "out"
  argv = ["--smoke", "--out-dir", str(out), "--noise", "0.4", "--seeds", "2"]
  fm.main([*argv, "--methods", "sgd", "sam"])
  before = (out / "runs.csv").read_bytes()
  first = json.loads((out / "config.json").read_text())
  text = fm.main([*argv, "--methods", *FAMILY])
  after = (out / "runs.csv").read_bytes()
  # The earlier rows are kept byte for byte, SAM's tuning is found, not rerun.
  assert after.startswith(before) and len(after) > len(before)
  rows = fm.read_runs(out / "runs.csv")
  n_before = len(before.decode().splitlines()) - 1
  assert {r["method"] for r in rows[n_before:]} == set(FAMILY)
  report = sorted((r["method"], r["seed"]) for r in rows if r["stage"] == "report")
  assert report == sorted((m, s) for m in ("sgd", "sam", *FAMILY) for s in (1, 2))
  for label in ("GSAM - SAM", "VaSSO - SAM", "LookSAM - SAM", "LookSAM - SGD"):
    assert f"| 40% | {label} |" in text
  lookhp = [r["hparams"] for r in rows if r["method"] == "looksam"]
  assert all(hp["every"] == 5 for hp in lookhp)
  # The first invocation is kept in config.json.
  config = json.loads((out / "config.json").read_text())
  assert config["methods"] == list(FAMILY)
  assert [s["methods"] for s in config["earlier_invocations"]] == [["sgd", "sam"]]
  assert config["earlier_invocations"][0]["environment"] == first["environment"]
  timing = (out / "timing.md").read_text()
  assert all(f"| {fm.METHODS[m].label} |" in timing for m in ("sgd", "sam", *FAMILY))
  assert "| SAM |" in timing and "| 1.00 |" in timing  # the ratio's reference
  # Rerunning trains nothing; a changed setting is refused as before.
  fm.main([*argv, "--methods", *FAMILY])
  assert (out / "runs.csv").read_bytes() == after
  with pytest.raises(ValueError, match="resume with the same settings or pass another --out-dir"):
    fm.main([*argv, "--methods", *FAMILY, "--lr", "0.1"])
  assert (out / "runs.csv").read_bytes() == after
