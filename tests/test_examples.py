"""The example scripts run on tiny settings; the CIFAR loader reads the real format."""

from __future__ import annotations

import argparse
import ast
import csv
import json
import pathlib
import sys
from types import ModuleType

import numpy as np
import pytest

from tests.examples_loader import EXAMPLES, load_example

pytest.importorskip("flax")
pytest.importorskip("orbax.checkpoint")
pytest.importorskip("sklearn")


digits = load_example("digits")
cifar = load_example("cifar")
fashion_mnist = load_example("fashion_mnist")
BENCHMARKS = EXAMPLES.parent / "benchmarks"


@pytest.mark.parametrize("module", [digits, cifar, fashion_mnist], ids=lambda m: m.__name__)
def test_every_option_of_an_example_has_a_help_text(
  module: ModuleType, capsys: pytest.CaptureFixture
) -> None:
  actions = [a for a in module.make_parser()._actions if not isinstance(a, argparse._HelpAction)]
  assert actions
  for action in actions:
    assert action.help and action.help != argparse.SUPPRESS, action.option_strings
  # --help, as the script answers it, lists every option with its text.
  with pytest.raises(SystemExit) as exit_:
    module.parse_args(["--help"])
  assert exit_.value.code == 0
  shown = " ".join(capsys.readouterr().out.split())
  for action in actions:
    assert action.option_strings[0] in shown
    assert " ".join(action.help.split()) in shown.replace("- ", "-")


@pytest.mark.parametrize("script", sorted(p.name for p in BENCHMARKS.glob("*.py")))
def test_every_option_of_a_benchmark_has_a_help_text(script: str) -> None:
  # Read, not run: the benchmarks import what the tests do not install (torch).
  tree = ast.parse((BENCHMARKS / script).read_text())
  for call in ast.walk(tree):
    if isinstance(call, ast.Call) and getattr(call.func, "attr", None) == "add_argument":
      helps = [k.value for k in call.keywords if k.arg == "help"]
      flag = ast.literal_eval(call.args[0])
      assert helps, f"{script}: {flag} has no help text"
      assert not isinstance(helps[0], ast.Constant) or helps[0].value, f"{script}: {flag}"


def test_digits_writes_table_csv_and_plot(
  tmp_path: pathlib.Path, capsys: pytest.CaptureFixture
) -> None:
  rows = digits.main(
    [
      "--quick",
      "--epochs",
      "1",
      "--seeds",
      "2",
      "--noise",
      "0.2",
      "--rho-grid",
      "0.05",
      "0.1",
      "--out-dir",
      str(tmp_path),
    ]
  )
  # One row per (method, noise, rho): SGD has no rho, SAM and F-SAM two each.
  assert [(r["method"], r["rho"]) for r in rows] == [
    ("sgd", 0.0),
    ("sam", 0.05),
    ("sam", 0.1),
    ("fsam", 0.05),
    ("fsam", 0.1),
  ]
  assert sum(r["chosen"] for r in rows) == 3
  assert all(0.0 <= r["test_acc_mean"] <= 1.0 for r in rows)
  with open(tmp_path / "results.csv") as f:
    assert len(list(csv.DictReader(f))) == 5
  table = (tmp_path / "results.md").read_text()
  assert "| 20% |" in table and "F-SAM" in table
  assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")
  # A --quick run says, on screen and in its files, that its numbers mean nothing; the table
  # comes with what it measures.
  out = capsys.readouterr().out
  caption = (
    "Clean test accuracy (%) on digits at the last epoch (epoch 1), mean ± std over 2 seeds (0-1)."
  )
  assert caption in out and caption in table
  assert "the rho in each cell, chosen from [0.05, 0.1] for the best mean" in out
  warning = "SMOKE RUN (--quick: 1 epoch, 2 seeds)"
  assert out.count(warning) == 2 and "numbers mean nothing" in out
  assert out.rindex(warning) < out.index(caption) < out.index("| label noise |")
  assert table.startswith(f"**{warning}") and "numbers mean nothing" in table
  assert json.loads((tmp_path / "config.json").read_text())["smoke"] is True


def test_digits_main_job_prints_no_smoke_warning() -> None:
  cfg = digits.parse_args([])
  assert not cfg.smoke and digits.parse_args(["--quick"]).smoke
  assert digits.caption(cfg).startswith(
    "Clean test accuracy (%) on digits at the last epoch (epoch 20), mean ± std over 5 seeds (0-4)."
  )


def test_digits_outputs_go_to_the_repository_and_quick_runs_apart() -> None:
  # Wherever the script runs from, and a --quick run never overwrites the main results.
  runs = EXAMPLES.parent / "runs"
  assert pathlib.Path(digits.parse_args([]).out_dir) == runs / "digits"
  assert pathlib.Path(digits.parse_args(["--quick"]).out_dir) == runs / "digits-quick"
  assert digits.parse_args(["--quick", "--out-dir", "elsewhere"]).out_dir == "elsewhere"


def test_digits_rho_is_chosen_on_validation_not_test() -> None:
  runs = {
    "rho": np.array([0.05, 0.05, 0.1, 0.1]),
    "val_acc": np.array([[0.9], [0.8], [0.7], [0.7]]),
    "test_acc": np.array([[0.1], [0.1], [0.9], [0.9]]),
  }
  assert digits.select_rho(runs) == 0.05


@pytest.mark.parametrize("dataset, classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_loader_reads_the_pickle_format(
  tmp_path: pathlib.Path, dataset: str, classes: int
) -> None:
  folder = cifar.write_fake_pickles(tmp_path, dataset, n_train=50, n_test=20)
  expected = (
    {
      "data_batch_1",
      "data_batch_2",
      "data_batch_3",
      "data_batch_4",
      "data_batch_5",
      "test_batch",
      "batches.meta",
    }
    if dataset == "cifar10"
    else {"train", "test", "meta"}
  )
  assert {p.name for p in folder.iterdir()} == expected
  # The parent folder works too, as with the unpacked tarball.
  data = cifar.load_pickles(tmp_path, dataset)
  assert data.x_train.shape == (50, 32, 32, 3) and data.x_train.dtype == np.uint8
  assert data.x_test.shape == (20, 32, 32, 3)
  assert data.y_train.dtype == np.int32 and data.num_classes == classes
  # Channel planes become the last axis: pixel (0, 0) holds bytes 0, 1024, 2048.
  raw = cifar._unpickle(folder / ("test_batch" if dataset == "cifar10" else "test"))[b"data"]
  np.testing.assert_array_equal(data.x_test[3, 0, 0], raw[3, [0, 1024, 2048]])
  np.testing.assert_array_equal(data.x_test[3, 1, 2], raw[3, [34, 1024 + 34, 2048 + 34]])


def test_cifar_missing_data_says_how_to_get_it(tmp_path: pathlib.Path) -> None:
  with pytest.raises(
    cifar.DataNotFoundError, match=r"curl -LO https://www.cs.toronto.edu/~kriz/cifar-100"
  ):
    cifar.load_pickles(tmp_path, "cifar100")
  with pytest.raises(cifar.DataNotFoundError, match="--data-dir"):
    cifar.load_pickles(None, "cifar10")


def test_cifar_smoke_trains_checkpoints_and_resumes(
  tmp_path: pathlib.Path, capsys: pytest.CaptureFixture
) -> None:
  argv = ["--smoke", "--epochs", "1", "--workdir", str(tmp_path)]
  first = cifar.main(argv)
  assert first["config"]["method"] == "fsam" and len(first["devices"]) >= 1
  assert [h["epoch"] for h in first["history"]] == [1]
  assert np.isfinite(first["history"][0]["train_loss"])
  assert (
    json.loads((tmp_path / "results.json").read_text())["final_test_acc"] == first["final_test_acc"]
  )
  assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 1
  # The same command again finds the checkpoint and has nothing left to train.
  second = cifar.main(argv)
  assert "resumed from" in capsys.readouterr().out
  assert second["history"] == first["history"]


def test_cifar_tfds_path_converts_what_tfds_returns(monkeypatch: pytest.MonkeyPatch) -> None:
  # A stand-in with tensorflow_datasets' documented shape of answer for
  # load(..., batch_size=-1) + as_numpy: a dict of whole-split arrays.
  rng = np.random.default_rng(0)
  calls = []

  def load(name: str, split: str, batch_size: int) -> dict[str, np.ndarray]:
    calls.append((name, split, batch_size))
    n = 12 if split == "train" else 5
    return {
      "image": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
      "label": rng.integers(0, 100, n).astype(np.int64),
    }

  fake = ModuleType("tensorflow_datasets")
  fake.load, fake.as_numpy = load, lambda tree: tree
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
  data = cifar.load_tfds("cifar100")
  assert calls == [("cifar100", "train", -1), ("cifar100", "test", -1)]
  assert data.x_train.shape == (12, 32, 32, 3) and data.x_test.shape == (5, 32, 32, 3)
  assert data.y_train.dtype == np.int32 and data.num_classes == 100


def test_cifar_tfds_missing_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import now fails
  with pytest.raises(ImportError, match="pip install tensorflow-datasets"):
    cifar.load_tfds("cifar10")
