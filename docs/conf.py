"""Sphinx configuration: MyST-NB pages and notebooks, executed at build time, offline output."""

from __future__ import annotations

import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "docs" / "_ext"))

# The kernels that run the guides and notebooks inherit this environment: 8
# simulated CPU devices (as in the tests) and the notebooks' small settings.
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("FSAM_NOTEBOOK_SMOKE", "1")
# The kernels import this checkout's fsam_optax, whatever else is installed.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

import fsam_optax  # noqa: E402

project = "fsam_optax"
author = "fsam_optax authors"
copyright = "fsam_optax authors"
release = version = fsam_optax.__version__

extensions = [
  "myst_nb",
  "sphinx.ext.autodoc",
  "sphinx.ext.napoleon",
  "mathml",
]
html_math_renderer = "mathml"

exclude_patterns = ["_build", "**.ipynb_checkpoints", "README.md"]

myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3

# Every guide and notebook runs on every build; a cell that fails fails the build.
# FSAM_DOCS_EXECUTE=off builds the pages without outputs (CI does, after the test suite
# has run every guide and notebook).
nb_execution_mode = os.environ.get("FSAM_DOCS_EXECUTE", "force")
nb_execution_timeout = 900
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True
# Tracebacks of the cells that show an error are not always valid for the
# IPython traceback lexer; they are then shown as plain text, which is fine.
suppress_warnings = ["misc.highlighting_failure"]
if nb_execution_mode == "off":
  # Unexecuted cells carry no kernel language for myst-nb to pick their lexer from.
  suppress_warnings.append("myst-nb.lexer")

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
# Optax's aliases by name, not expanded into their long unions.
autodoc_type_aliases = {
  name: name for name in ("optax.ScalarOrSchedule", "optax.Updates", "optax.Params")
}
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "furo"
html_title = f"fsam_optax {release}"
html_static_path = ["_static"]
# Without an icon the browser asks for /favicon.ico and logs a 404.
html_favicon = "_static/favicon.svg"
html_css_files = ["math.css"]
html_show_sourcelink = False
