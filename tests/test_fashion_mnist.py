"""examples/fashion_mnist.py: the IDX reader, its errors, the protocol and a smoke study."""

from __future__ import annotations

import csv
import gzip
import json
import pathlib
import struct

import jax
import numpy as np
import pytest

from tests.examples_loader import load_example

pytest.importorskip("flax")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

fm = load_example("fashion_mnist")
HINT = ("--data-dir", "sudo apt-get install dataset-fashion-mnist")


def _idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
  """The IDX format written out by hand (not by the example's writer)."""
  magic = 0x800 + array.ndim if magic is None else magic
  header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
  return header + array.astype(np.uint8).tobytes()


def _write_set(folder: pathlib.Path, n_train: int = 400, n_test: int = 100, gz: bool = True):
  """Four files in the real naming and format; each class lights its own rows."""
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(1)
  arrays = {}
  for part, n in (("train", n_train), ("t10k", n_test)):
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = rng.integers(0, 80, (n, 28, 28)).astype(np.uint8)
    for i, c in enumerate(labels):
      images[i, 2 * c + 4 : 2 * c + 7] = 250
    for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
      raw = _idx_bytes(array)
      name = f"{part}-{kind}-ubyte"
      if gz:
        (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
      else:
        (folder / name).write_bytes(raw)
      arrays[f"{part}_{kind[:6]}"] = array
  return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_reads_real_format_gzipped_or_not(tmp_path: pathlib.Path, gz: bool) -> None:
  written = _write_set(tmp_path, gz=gz)
  arrays = fm.load_fashion_mnist(tmp_path)
  np.testing.assert_array_equal(arrays["train_images"], written["train_images"])
  np.testing.assert_array_equal(arrays["train_labels"], written["train_labels"])
  np.testing.assert_array_equal(arrays["test_images"], written["t10k_images"])
  np.testing.assert_array_equal(arrays["test_labels"], written["t10k_labels"])
  assert arrays["train_images"].dtype == np.uint8 and arrays["train_images"].shape == (400, 28, 28)


def test_missing_files_name_data_dir_and_package(tmp_path: pathlib.Path) -> None:
  with pytest.raises(fm.DataError, match="train-images-idx3-ubyte") as e:
    fm.load_fashion_mnist(tmp_path / "nowhere")
  assert all(h in str(e.value) for h in HINT)
  assert isinstance(e.value, ValueError)


def test_wrong_magic_number(tmp_path: pathlib.Path) -> None:
  _write_set(tmp_path, gz=False)
  labels = np.zeros(400, np.uint8)
  (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(labels, magic=0x0D01))
  with pytest.raises(fm.DataError, match="magic number 00000d01, expected 00000801") as e:
    fm.load_fashion_mnist(tmp_path)
  assert all(h in str(e.value) for h in HINT)


@pytest.mark.parametrize("gz", [True, False])
def test_truncated_file(tmp_path: pathlib.Path, gz: bool) -> None:
  _write_set(tmp_path, gz=gz)
  path = tmp_path / ("t10k-images-idx3-ubyte" + (".gz" if gz else ""))
  raw = path.read_bytes()
  path.write_bytes(raw[: len(raw) // 2])
  match = "truncated gzip" if gz else r"truncated: the header gives shape \(100, 28, 28\)"
  with pytest.raises(fm.DataError, match=match) as e:
    fm.load_fashion_mnist(tmp_path)
  assert all(h in str(e.value) for h in HINT)


def test_labels_that_do_not_match_the_images(tmp_path: pathlib.Path) -> None:
  _write_set(tmp_path, gz=False)
  (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(399, np.uint8)))
  with pytest.raises(fm.DataError, match="400 images but 399 labels"):
    fm.load_fashion_mnist(tmp_path)


def test_noise_is_exact_symmetric_and_shared_by_methods() -> None:
  labels = np.arange(1000, dtype=np.int32) % 10
  noisy = fm.label_noise.symmetric_noise(labels, 0.4, np.random.default_rng(0))
  assert np.sum(noisy != labels) == 400  # every flipped label changes class
  # Every wrong class is used, in roughly equal amounts (about 44 each).
  wrong = (noisy - labels)[noisy != labels] % 10
  assert set(np.unique(wrong)) == set(range(1, 10))
  data = fm.Data(*(labels,) * 6)
  a, b = fm.noisy_labels(data, 0.4, seed=3), fm.noisy_labels(data, 0.4, seed=3)
  np.testing.assert_array_equal(a[0], b[0])
  assert np.any(fm.noisy_labels(data, 0.4, seed=4)[0] != a[0])


def test_same_seed_same_initialisation_for_every_method() -> None:
  x = np.zeros((64, 196), np.float32)
  y = np.zeros(64, np.int32)
  data = fm.Data(x, y, x, y, x, y)
  settings = fm.Settings(hidden=(8,), batch_size=32, epochs=1)
  key = jax.random.key(7)
  hp = {"rho": np.float32(0.1), "lmbda": np.float32(0.9)}
  params = [
    fm.Trainer(m, settings, data).init(key, {k: hp[k] for k in want})[0]
    for m, want in (("sgd", ()), ("sam", ("rho",)), ("fsam", ("rho", "lmbda")))
  ]
  for other in params[1:]:
    for a, b in zip(jax.tree.leaves(params[0]), jax.tree.leaves(other), strict=True):
      np.testing.assert_array_equal(a, b)


class ScoredStudy(fm.Study):
  """Scores a run by a given function of its hyperparameters instead of training.

  Every run it is asked for is a tuning run at 40% noise on the tuning seed.
  """

  def __init__(self, score):
    self.score, self.calls = score, []
    self.settings = fm.Settings(epochs=1)
    self.bar = type("Bar", (), {"total": 0})()

  def get(self, stage, method, noise, seed, hp):
    assert (stage, noise, seed) == ("tune", 0.4, fm.TUNING_SEED)
    if (method, hp) not in self.calls:  # the real Study finds repeats in its CSV
      self.calls.append((method, dict(hp)))
    return {"final_val_acc": self.score(method, hp)}


def test_tuning_widens_the_grid_at_its_edges() -> None:
  # SAM's validation accuracy peaks at rho 0.8; F-SAM's falls with lmbda and peaks at rho 0.2.
  score = lambda method, hp: (
    -abs(hp["rho"] - 0.8) if method == "sam" else -hp["lmbda"] - abs(hp["rho"] - 0.2)
  )
  study = ScoredStudy(score)
  assert study.choose("fsam", 0.4) == {"rho": 0.2, "sigma": 1.0, "lmbda": 0.0}
  assert [hp["rho"] for m, hp in study.calls if m == "sam"] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.6]
  fsam = [(hp["lmbda"], hp["rho"]) for m, hp in study.calls if m == "fsam"]
  assert fsam == [
    # lmbda at SAM's rho, widened down to the end of the ladder;
    *[(0.6, 0.8), (0.9, 0.8), (0.95, 0.8), (0.3, 0.8), (0.0, 0.8)],
    # then rho around SAM's, widened down until the best is inside.
    *[(0.0, 0.4), (0.0, 1.6), (0.0, 0.2), (0.0, 0.1)],
  ]
  assert all(hp["sigma"] == 1.0 for m, hp in study.calls if m == "fsam")


def test_a_method_can_start_from_another_methods_choice(monkeypatch) -> None:
  # A variant with a fixed setting of its own and F-SAM's tuned values: no runs of its own.
  variant = fm.Method("F-SAM variant", front=lambda hp: None, fixed={"k": 2}, start_from="fsam")
  monkeypatch.setitem(fm.METHODS, "variant", variant)
  study = ScoredStudy(lambda method, hp: -abs(hp["rho"] - 0.1) - hp.get("lmbda", 0))
  chosen = study.choose("variant", 0.4)
  assert chosen == {"rho": 0.1, "sigma": 1.0, "lmbda": 0.0, "k": 2}
  assert {m for m, _ in study.calls} == {"sam", "fsam"}


def test_bad_flags_are_refused(tmp_path: pathlib.Path) -> None:
  _write_set(tmp_path, gz=False)
  argv = ["--smoke", "--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "out")]
  with pytest.raises(ValueError, match=r"--noise must be in \[0, 0.9\], got 0.95"):
    fm.main([*argv, "--noise", "0.95"])
  with pytest.raises(ValueError, match=r"--seeds must be in \[1, 10\]"):
    fm.main([*argv, "--seeds", "11"])
  with pytest.raises(ValueError, match=r"--subset must be in \[10, 400\], got 500"):
    fm.main([*argv, "--subset", "500"])


def _row(method: str, noise: float, seed: int, final: float, early: float, hp=None) -> dict:
  return {
    "stage": "report",
    "method": method,
    "noise": noise,
    "seed": seed,
    "hparams": hp or {},
    "final_test_acc": final,
    "early_stop_test_acc": early,
    "test_acc": [final - 0.05, early + 0.02, final],
  }


def test_report_pairs_seeds_and_handles_an_extra_method(monkeypatch) -> None:
  extra = fm.Method("F-SAM/2", front=fm.METHODS["fsam"].front, compare_to=("fsam", "sam"))
  monkeypatch.setitem(fm.METHODS, "fsam2", extra)
  acc = {"sgd": (0.70, 0.72, 0.74), "sam": (0.80, 0.81, 0.85), "fsam": (0.81, 0.83, 0.84)}
  rows = [_row(m, 0.4, s + 1, a[s], a[s] + 0.01) for m, a in acc.items() for s in range(3)]
  rows.append(_row("fsam2", 0.4, 2, 0.90, 0.90))  # only seed 2: paired on that seed alone
  text = fm.markdown_report(rows)
  assert "| 40% | 72.00 ± 2.00 | 82.00 ± 2.65 | 82.67 ± 1.53 | 90.00 ± nan |" in text
  # SAM - SGD: +10, +9, +11 points; mean 10, sd 1, half-width 4.303 / sqrt(3) = 2.48.
  assert "| 40% | SAM - SGD | +10.00 [+7.52, +12.48] | +10.00, +9.00, +11.00 |" in text
  assert "| 40% | F-SAM - SAM | +0.67 [" in text and "+1.00, +2.00, -1.00 |" in text
  assert "| 40% | F-SAM/2 - F-SAM | +7.00 [+nan, +nan] | +7.00 |" in text
  assert "| 40% | F-SAM/2 - SAM | +9.00 [+nan, +nan] | +9.00 |" in text
  # SGD's best epoch is 2 points above its early-stopping epoch: 73 + 2 = 75, 72 final.
  assert "| 40% | 75.00 | 72.00 | 3.00 |" in text


def test_t_quantiles_match_scipy() -> None:
  stats = pytest.importorskip("scipy.stats")
  for dof, t in fm.T_975.items():
    assert t == pytest.approx(stats.t.ppf(0.975, dof), abs=5e-4)


def test_smoke_study_writes_everything_and_resumes(tmp_path: pathlib.Path) -> None:
  _write_set(tmp_path / "data", n_train=300, n_test=100, gz=True)
  out = tmp_path / "out"
  argv = ["--smoke", "--data-dir", str(tmp_path / "data"), "--out-dir", str(out)]
  argv += ["--noise", "0.4", "--seeds", "2", "--methods", "sgd", "sam", "fsam"]
  text = fm.main(argv)
  with open(out / "runs.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  report = [r for r in rows if r["stage"] == "report"]
  assert sorted((r["method"], r["seed"]) for r in report) == [
    (m, s) for m in ("fsam", "sam", "sgd") for s in ("1", "2")
  ]
  assert {r["seed"] for r in rows if r["stage"] == "tune"} == {"0"}
  # SAM's rho grid and F-SAM's lmbda grid have at least 3 values each.
  assert len({r["hparams"] for r in rows if r["method"] == "sam"}) >= 3
  assert len({json.loads(r["hparams"])["lmbda"] for r in rows if r["method"] == "fsam"}) >= 3
  for r in rows:
    curves = [json.loads(r[k]) for k in ("train_acc", "val_acc", "test_acc", "train_s", "eval_s")]
    assert all(len(c) == 2 for c in curves)  # --smoke trains 2 epochs
    assert all(0.0 <= a <= 1.0 for c in curves[:3] for a in c)
    assert int(r["best_val_epoch"]) in (1, 2)
  assert "SAM - SGD" in text and "F-SAM - SAM" in text
  assert (out / "fashion_mnist.png").stat().st_size > 10_000
  assert (out / "results.md").read_text().startswith("# Fashion-MNIST")
  config = json.loads((out / "config.json").read_text())
  assert config["settings"]["epochs"] == 2 and config["split"] == {
    "train": 270,
    "val": 30,
    "test": 100,
  }
  assert {"jax", "optax", "flax", "git_commit", "machine"} <= set(config["environment"])
  # Resuming trains nothing: the CSV is unchanged.
  before = (out / "runs.csv").read_bytes()
  fm.main(argv)
  assert (out / "runs.csv").read_bytes() == before
  # Other settings in the same folder are refused.
  with pytest.raises(ValueError, match="resume with the same settings or pass another --out-dir"):
    fm.main([*argv, "--epochs", "3"])


def test_cnn_and_every_second_step_variant_on_smoke_data(tmp_path: pathlib.Path) -> None:
  _write_set(tmp_path / "data", n_train=300, n_test=100, gz=False)
  argv = ["--smoke", "--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "out")]
  argv += ["--pool", "1", "--conv", "4", "8", "--noise", "0.4", "--seeds", "2"]
  text = fm.main([*argv, "--methods", "sam", "fsam", "fsam_every2"])
  rows = fm.read_runs(tmp_path / "out" / "runs.csv")
  every2 = [r for r in rows if r["method"] == "fsam_every2"]
  # The variant takes F-SAM's chosen values and trains the reporting seeds only.
  fsam_hp = [r["hparams"] for r in rows if r["method"] == "fsam" and r["stage"] == "report"]
  assert [(r["stage"], r["seed"]) for r in every2] == [("report", 1), ("report", 2)]
  assert [r["hparams"] for r in every2] == fsam_hp
  assert "F-SAM every 2 - F-SAM" in text
  with pytest.raises(ValueError, match="--conv"):
    fm.main([*argv, "--conv", "4", "4", "4", "--out-dir", str(tmp_path / "other")])


REAL = pathlib.Path(fm.DEFAULT_DATA_DIR)


@pytest.mark.skipif(
  not (REAL / "train-images-idx3-ubyte.gz").exists()
  and not (REAL / "train-images-idx3-ubyte").exists(),
  reason=f"Fashion-MNIST is not installed in {REAL} (sudo apt-get install dataset-fashion-mnist)",
)
def test_one_epoch_on_the_installed_files(tmp_path: pathlib.Path) -> None:
  arrays = fm.load_fashion_mnist(REAL)
  assert arrays["train_images"].shape == (60_000, 28, 28)
  assert arrays["test_images"].shape == (10_000, 28, 28)
  assert np.bincount(arrays["test_labels"]).tolist() == [1000] * 10
  argv = ["--out-dir", str(tmp_path), "--subset", "3000", "--epochs", "1", "--hidden", "64"]
  fm.main([*argv, "--methods", "sgd", "--noise", "0.4", "--seeds", "1"])
  rows = fm.read_runs(tmp_path / "runs.csv")
  assert [(r["stage"], r["seed"]) for r in rows] == [("tune", 0), ("report", 1)]
  # One epoch on 2,700 images with 40% wrong labels is already far above chance.
  assert all(r["final_test_acc"] > 0.6 for r in rows)


def test_docstring_examples() -> None:
  import doctest

  result = doctest.testmod(fm)
  assert result.attempted >= 2 and result.failed == 0


RESULTS = pathlib.Path(__file__).resolve().parents[1] / "results"
STUDIES = ["fashion_mnist", "fashion_mnist_cnn", "fashion_mnist_every2"]


@pytest.mark.parametrize("name", STUDIES)
def test_committed_tables_come_from_the_committed_runs(name: str, tmp_path: pathlib.Path) -> None:
  study = RESULTS / name
  for file in ("runs.csv", "config.json"):
    (tmp_path / file).write_bytes((study / file).read_bytes())
  fm.write_report(tmp_path)
  assert (tmp_path / "results.md").read_text() == (study / "results.md").read_text()
  rows = fm.read_runs(study / "runs.csv")
  # The regime the study is about: at 40% noise SGD ends >= 3 points below its best epoch.
  sgd = [r for r in rows if (r["method"], r["noise"], r["stage"]) == ("sgd", 0.4, "report")]
  assert len(sgd) == 3
  assert np.mean([max(r["test_acc"]) - r["final_test_acc"] for r in sgd]) >= 0.03
  # Seeds 1-3 report, seed 0 tunes; every run has all its epochs.
  assert {r["seed"] for r in rows if r["stage"] == "report"} == {1, 2, 3}
  assert {r["seed"] for r in rows if r["stage"] == "tune"} == {fm.TUNING_SEED}
  assert all(len(r["test_acc"]) == 50 for r in rows)
