"""Every notebook runs top to bottom (small settings via FSAM_NOTEBOOK_SMOKE=1)."""

from __future__ import annotations

import pathlib

import pytest

import fsam_optax

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("flax")

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
# fsam-optax is not on PyPI yet: in Colab the first cell installs the build the reader uploads
# (the wheel, or for the CIFAR notebook the sdist, which also carries examples/).
WHEEL = f"fsam_optax-{fsam_optax.__version__}-py3-none-any.whl"
SDIST = f"fsam_optax-{fsam_optax.__version__}.tar.gz"


@pytest.mark.parametrize("name", ["quickstart", "multi_device", "cifar_resnet"])
def test_notebook_runs_and_installs_the_distribution_in_colab(
  name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
  path = NOTEBOOKS / f"{name}.ipynb"
  book = nbformat.read(path, as_version=4)
  # In Colab the package comes from a file the reader built; no repository URL to fill in.
  build = SDIST if name == "cifar_resnet" else WHEEL
  install = book.cells[1].source
  assert "if IN_COLAB:" in install and "files.upload()" in install
  assert f'%pip install -q "{build}[examples]"' in install
  assert "github.com" not in path.read_text()
  # The kernel inherits this environment: the notebooks shrink their runs.
  monkeypatch.setenv("FSAM_NOTEBOOK_SMOKE", "1")
  client = nbclient.NotebookClient(
    book, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
  )
  client.execute()  # raises CellExecutionError, with the cell and traceback, on any failure
  errors = [
    o for c in book.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"
  ]
  assert not errors
