"""Renders ``math`` at build time to MathML, which browsers display without scripts or fonts.

The pages then need nothing from the network, and no bundled JavaScript, to show equations.
"""

from __future__ import annotations

from typing import Any

from docutils import nodes
from latex2mathml.converter import convert
from sphinx.application import Sphinx


def _block_latex(latex: str) -> str:
  # latex2mathml has no `aligned`; an array of right- and left-aligned columns
  # lays out `a &= b \\ c &= d` the same way.
  if "&" in latex or "\\\\" in latex:
    return r"\begin{array}{rl}" + latex + r"\end{array}"
  return latex


def _mathml(latex: str, display: str, node: nodes.Element) -> str:
  try:
    return convert(latex, display=display)
  except Exception as err:
    # latex2mathml's own errors name no formula; the build log should.
    raise ValueError(f"{node.source}:{node.line}: cannot render {latex!r}: {err!r}") from err


def _visit_inline(self: Any, node: nodes.Element) -> None:
  self.body.append(_mathml(node.astext(), "inline", node))
  raise nodes.SkipNode


def _visit_block(self: Any, node: nodes.Element) -> None:
  ids = node.get("ids")
  self.body.append(f'<div class="math-block" id="{ids[0]}">' if ids else '<div class="math-block">')
  # Sphinx separates the equations of one block by blank lines.
  for part in (p.strip() for p in node.astext().split("\n\n")):
    if part:
      self.body.append(_mathml(_block_latex(part), "block", node))
  self.body.append("</div>")
  raise nodes.SkipNode


def setup(app: Sphinx) -> dict[str, Any]:
  app.add_html_math_renderer("mathml", (_visit_inline, None), (_visit_block, None))
  return {"parallel_read_safe": True, "parallel_write_safe": True}
