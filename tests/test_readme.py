"""Every ```python block of the README runs, and its result table is the committed one, so
the README cannot drift from the code or the results."""

from __future__ import annotations

import pathlib
import re

import pytest

README = pathlib.Path(__file__).parent.parent / "README.md"
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
