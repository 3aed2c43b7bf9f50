"""Every ```python block of the README runs, so the README cannot drift from the code."""

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
