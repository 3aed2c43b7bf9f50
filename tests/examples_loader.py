"""Imports a script of ``examples/`` as a module, for the tests of the examples."""

from __future__ import annotations

import importlib.util
import pathlib
import sys
from types import ModuleType

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
# The scripts import their shared pieces (examples/resnet.py, label_noise.py) from their folder.
sys.path.insert(0, str(EXAMPLES))


def load_example(name: str) -> ModuleType:
  """``examples/{name}.py`` as the module ``examples_{name}``, loaded once per process."""
  module_name = f"examples_{name}"
  if module_name in sys.modules:
    return sys.modules[module_name]
  spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[module_name] = module  # dataclasses look their module up here
  spec.loader.exec_module(module)
  return module
