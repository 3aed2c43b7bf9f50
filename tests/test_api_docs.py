"""The API reference page documents every public name, and nothing that is not public."""

from __future__ import annotations

import pathlib
import re

import fsam_optax

API_PAGE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "api.md"


def test_api_page_documents_exactly_the_public_names():
  documented = re.findall(
    r"^\.\. auto(?:function|class):: fsam_optax\.(\w+)$", API_PAGE.read_text(), re.M
  )
  assert sorted(documented) == sorted(fsam_optax.__all__)
  assert len(documented) == len(set(documented))
