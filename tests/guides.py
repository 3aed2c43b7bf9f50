"""Runs a MyST-NB markdown guide the way the docs build does: its code cells in one kernel."""

from __future__ import annotations

import os
import pathlib
import re

import nbclient
import nbformat

_CELL = re.compile(r"^```\{code-cell\}[^\n]*\n(.*?)^```", flags=re.S | re.M)
_OPTION = re.compile(r"^:(\w[\w-]*):\s*(.*)$")


def _cell(body: str) -> nbformat.NotebookNode:
  """A code cell from a ``{code-cell}`` body, with its ``:tags: [...]`` option."""
  lines = body.splitlines()
  tags: list[str] = []
  while lines and (option := _OPTION.match(lines[0])):
    if option.group(1) == "tags":
      tags = [t.strip() for t in option.group(2).strip("[]").split(",") if t.strip()]
    lines = lines[1:]
  cell = nbformat.v4.new_code_cell("\n".join(lines).strip("\n"))
  cell.metadata["tags"] = tags
  return cell


def code_cells(path: pathlib.Path) -> list[nbformat.NotebookNode]:
  return [_cell(body) for body in _CELL.findall(path.read_text())]


def run_guide(path: pathlib.Path, timeout: int = 600) -> nbformat.NotebookNode:
  """Executes every code cell of ``path`` in a fresh kernel and returns the notebook.

  A cell tagged ``raises-exception`` must raise (nbclient records the error and
  goes on); any other error fails the run with the cell and its traceback.
  """
  book = nbformat.v4.new_notebook(cells=code_cells(path))
  client = nbclient.NotebookClient(
    book, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
  )
  # The kernel imports this checkout's fsam_optax, not whichever one is installed.
  repo = str(pathlib.Path(__file__).resolve().parents[1])
  pythonpath = os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))
  client.execute(env={**os.environ, "PYTHONPATH": pythonpath})
  for cell in book.cells:
    if "raises-exception" in cell.metadata["tags"]:
      errors = [o for o in cell.outputs if o.output_type == "error"]
      assert errors, f"{path.name}: a raises-exception cell ran without error:\n{cell.source}"
  return book
