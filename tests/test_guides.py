"""Every guide under docs/guides/ runs top to bottom, as the docs build runs it."""

from __future__ import annotations

import pathlib

import pytest

pytest.importorskip("nbclient")

from tests.guides import code_cells, run_guide

GUIDES = sorted((pathlib.Path(__file__).resolve().parents[1] / "docs" / "guides").glob("*.md"))


@pytest.mark.parametrize("path", GUIDES, ids=[p.stem for p in GUIDES])
def test_guide_runs(path: pathlib.Path) -> None:
  assert code_cells(path), f"{path.name} has no code cells to execute"
  run_guide(path)
