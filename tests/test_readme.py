"""Every ```python block of the README runs, its result table is the committed one and its
digits figures are those of the results page, so the README cannot drift from the code or the
results; and no install command of the README, the docs or the notebooks needs a package index."""

from __future__ import annotations

import pathlib
import re

import pytest

import fsam_optax

ROOT = pathlib.Path(__file__).parent.parent
README = ROOT / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_readme_has_code_blocks():
  assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index):
  # Each block stands alone: a fresh namespace, as a reader pasting it would have.
  code = compile(BLOCKS[index], f"README.md block {index}", "exec", dont_inherit=True)
  exec(code, {"__name__": "__readme__"})


def test_ci_runs_the_readme_test_command():
  commands = re.findall(r"^```bash\n(.*?)^```", README.read_text(), flags=re.S | re.M)
  test_command = next(c.strip() for c in commands if "pytest" in c)
  ci = (README.parent / ".ci" / "run").read_text().splitlines()
  assert test_command in ci


def test_result_table_is_the_committed_study_table():
  # The README's table is the final-epoch table of results/fashion_mnist/results.md,
  # header and rows verbatim: a rerun of the study that changes a figure fails here.
  table = re.findall(r"^\| label noise \|.*?\n(?=[^|])", README.read_text(), flags=re.S | re.M)
  committed = (README.parent / "results" / "fashion_mnist" / "results.md").read_text()
  assert len(table) == 1
  assert table[0].count("\n") == 6  # header, rule, four noise rates
  assert table[0] in committed


def test_readme_links_the_main_job_result():
  # The README quotes the 40% row of the digits result page, which the main job prints.
  text = " ".join(README.read_text().split())
  assert "([table and protocol](docs/results/digits.md))" in text
  quoted = re.search(r"At 40% label noise: SGD ([\d.]+), SAM ([\d.]+), F-SAM ([\d.]+);", text)
  row = re.search(r"^\| 40% \|.*$", (ROOT / "docs" / "results" / "digits.md").read_text(), re.M)
  assert quoted and row
  assert re.findall(r"(\d+\.\d+) ±", row[0]) == list(quoted.groups())


def _install_texts():
  """README, the docs pages and the notebooks (the docs show the notebooks too)."""
  files = {README, *(ROOT / "docs").rglob("*.md"), *(ROOT / "notebooks").glob("*.ipynb")}
  return {path.relative_to(ROOT): path.read_text() for path in sorted(files)}


def test_install_commands_work_without_a_package_index():
  # fsam-optax is not on PyPI: every install command names a clone or a built file.
  texts = _install_texts()
  assert any(path.suffix == ".ipynb" for path in texts)
  by_name = re.compile(r"pip install[^\n]*?(?<![\w./-])[\"']?fsam[-_]optax(?![\w.-])")
  for path, text in texts.items():
    assert "pip install fsam-optax" not in text, path
    assert not by_name.search(text), (path, by_name.search(text)[0])
  # The built files the install text names are those of the current version.
  version = fsam_optax.__version__
  for path, text in texts.items():
    for name in re.findall(r"fsam_optax-(\d[\w.]*?)(?:-py3|\.tar)", text):
      assert name == version, (path, name, version)
