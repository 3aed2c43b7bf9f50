"""The API reference page documents every public name, and nothing that is not public."""

from __future__ import annotations

import pathlib
import re

import fsam_optax
from fsam_optax import testing

API_PAGE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "api.md"


def test_api_page_documents_exactly_the_public_names():
  documented = re.findall(
    r"^\.\. auto(?:function|class):: fsam_optax\.(\w+)$", API_PAGE.read_text(), re.M
  )
  assert sorted(documented) == sorted(fsam_optax.__all__)
  assert len(documented) == len(set(documented))


def test_api_page_documents_the_testing_module_by_its_public_names():
  # `:members:` documents a module's `__all__`: what the module declares public is the page.
  section = re.search(
    r"^\.\. automodule:: fsam_optax\.testing\n   :members:$", API_PAGE.read_text(), re.M
  )
  assert section is not None
  assert all(not name.startswith("_") and hasattr(testing, name) for name in testing.__all__)
  public = {n for n, v in vars(testing).items() if callable(v) and n.startswith("check_")}
  assert public <= set(testing.__all__)
