"""Mutation testing of the core update: do the property tests alone catch wrong F-SAM maths?

Each mutant is a plausible mistake (the moving average fed the direction, a per-tensor
norm, no ``eps``, a flipped sign, ...) made by rewriting the syntax tree of one function
of ``fsam_optax/``. The function is named by its qualified name, as Python's
``__qualname__`` spells it: ``moving_average``, ``FSAMState.direction``,
``perturbation.<locals>.weighted``, ``fsam.<locals>.update_fn.<locals>.advance``. It is
looked up in every module of the package, so a mutant survives a function moving between
modules and any reformatting. Inside the function (nested functions included) a mutation
finds its node by meaning, not by position in the file:

- ``Replace(expr, by)``: the expression whose ``ast.unparse`` equals ``expr`` becomes ``by``;
- ``Unwrap(call)``: the call ``x.f(...)`` becomes ``x`` (``keep="argument"``: ``f(x)`` -> ``x``);
- ``SwapOp(old, new)``: the operator ``old`` (``ast.Sub``, ``ast.Lt``, ...) becomes ``new``;
- ``SetConstant(old, new)``: the constant ``old`` becomes ``new``.

Each finds exactly one node unless given ``nth`` (1 for the first, in source order);
``within`` narrows ``SwapOp`` and ``SetConstant`` to the expression of that text. The
mutated module is written back with ``ast.unparse`` into a copy of the package in a
temporary folder, and only ``TESTS`` run against it: ``tests/test_properties.py``, the
reference test of the multi-output-fusion layout and the two schedule tests that pin which
steps take the SAM step. A mutant is *killed* when a test fails.

A mutant whose function or node is missing or ambiguous is an error, not a survivor: every
mutant is checked before anything runs, and the message says what to update here. Run
from the repository root::

  python tools/mutate.py            # every mutant, 2 at a time
  python tools/mutate.py -j 1 -k eps

Exit status 0 when at least ``--min-killed`` (default 80%) of the mutants are killed.
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "fsam_optax"
TESTS = [
  "tests/test_properties.py",
  # The layout traced where XLA has multi-output fusion, which the CPU does not use by default.
  "tests/test_traffic.py::test_the_multi_output_fusion_layout_equals_the_reference",
  # The float64 references take the SAM steps the library reports; these pin which ones.
  "tests/test_schedule.py::test_every_k_takes_steps_0_k_2k",
  "tests/test_schedule.py::test_probability_takes_the_documented_draw",
]

Function = ast.FunctionDef | ast.AsyncFunctionDef
Value = int | float | str | None  # of a constant
Operator = type[ast.operator] | type[ast.unaryop] | type[ast.boolop] | type[ast.cmpop]


class MutantError(Exception):
  """A mutant that names no function or node, or more than one."""


def _expr(expr: str) -> ast.expr:
  return ast.parse(expr, mode="eval").body


def _text(expr: str) -> str:
  """``expr`` as ``ast.unparse`` spells it, so that a mutant's spacing does not matter."""
  return ast.unparse(_expr(expr))


def _preorder(node: ast.AST) -> Iterator[ast.AST]:
  """``node`` and its descendants, in source order."""
  yield node
  for child in ast.iter_child_nodes(node):
    yield from _preorder(child)


def _within(function: Function, text: str | None) -> Iterator[ast.AST]:
  """The nodes of ``function``, or only those inside (or equal to) an expression ``text``."""
  if text is None:
    yield from _preorder(function)
    return
  wanted = _text(text)
  for node in _preorder(function):
    if isinstance(node, ast.expr) and ast.unparse(node) == wanted:
      yield from _preorder(node)


def _operators(node: ast.AST) -> list[ast.AST]:
  if isinstance(node, ast.BinOp | ast.UnaryOp | ast.BoolOp):
    return [node.op]
  if isinstance(node, ast.Compare):
    return list(node.ops)
  return []


@dataclass(frozen=True)
class Replace:
  """The expression ``expr`` replaced by ``by``."""

  expr: str
  by: str
  nth: int | None = None

  def targets(self, function: Function) -> list[ast.AST]:
    wanted = _text(self.expr)
    return [
      n
      for n in _preorder(function)
      if isinstance(n, ast.expr)
      and not isinstance(getattr(n, "ctx", None), ast.Store)
      and ast.unparse(n) == wanted
    ]

  def mutate(self, node: ast.AST) -> ast.AST:
    return _expr(self.by)

  def describe(self) -> str:
    return f"the expression {_text(self.expr)!r}"


@dataclass(frozen=True)
class Unwrap:
  """The call ``call`` replaced by its receiver (``x.f(...)`` -> ``x``) or its ``argument``."""

  call: str
  keep: Literal["receiver", "argument"] = "receiver"
  nth: int | None = None

  def targets(self, function: Function) -> list[ast.AST]:
    wanted = _text(self.call)
    return [n for n in _preorder(function) if isinstance(n, ast.Call) and ast.unparse(n) == wanted]

  def mutate(self, node: ast.AST) -> ast.AST:
    assert isinstance(node, ast.Call)  # as targets() found it
    if self.keep == "argument" and len(node.args) == 1:
      return node.args[0]
    if self.keep == "receiver" and isinstance(node.func, ast.Attribute):
      return node.func.value
    raise MutantError(f"{self.describe()} has no {self.keep} to keep")

  def describe(self) -> str:
    return f"the call {_text(self.call)!r}"


@dataclass(frozen=True)
class SwapOp:
  """The operator ``old`` (in a binary, unary, boolean or comparison node) replaced by ``new``."""

  old: Operator
  new: Operator
  within: str | None = None
  nth: int | None = None

  def targets(self, function: Function) -> list[ast.AST]:
    return [
      n
      for n in _within(function, self.within)
      if any(isinstance(op, self.old) for op in _operators(n))
    ]

  def mutate(self, node: ast.AST) -> ast.AST:
    new = self.new()  # a fresh node: parsed operators are shared, one instance per kind
    if isinstance(node, ast.Compare) and isinstance(new, ast.cmpop):
      node.ops = [new if isinstance(op, self.old) else op for op in node.ops]
    elif isinstance(node, ast.BinOp) and isinstance(new, ast.operator):
      node.op = new
    elif isinstance(node, ast.UnaryOp) and isinstance(new, ast.unaryop):
      node.op = new
    elif isinstance(node, ast.BoolOp) and isinstance(new, ast.boolop):
      node.op = new
    else:
      raise MutantError(f"ast.{self.new.__name__} cannot replace ast.{self.old.__name__}")
    return node

  def describe(self) -> str:
    where = "" if self.within is None else f" in {_text(self.within)!r}"
    return f"the operator ast.{self.old.__name__}{where}"


@dataclass(frozen=True)
class SetConstant:
  """The constant ``old`` (of the same type: ``0`` is not ``0.0``) replaced by ``new``."""

  old: Value
  new: Value
  within: str | None = None
  nth: int | None = None

  def targets(self, function: Function) -> list[ast.AST]:
    return [
      n
      for n in _within(function, self.within)
      if isinstance(n, ast.Constant) and type(n.value) is type(self.old) and n.value == self.old
    ]

  def mutate(self, node: ast.AST) -> ast.AST:
    return ast.Constant(self.new)

  def describe(self) -> str:
    where = "" if self.within is None else f" in {_text(self.within)!r}"
    return f"the constant {self.old!r}{where}"


Mutation = Replace | Unwrap | SwapOp | SetConstant


class Mutant(NamedTuple):
  name: str
  function: str
  mutations: tuple[Mutation, ...]


def mutant(name: str, function: str, *mutations: Mutation) -> Mutant:
  return Mutant(name, function, mutations)


F_SAM_NORM = "(g - sigma * m).astype(g.dtype)"  # FSAMState.direction's d for the norm
F_SAM_STEP = "(g + (-sigma) * m).astype(g.dtype)"  # and for the step (Direction.for_step)
EMA = "moving_average.<locals>.one"  # the update of one leaf of the moving average
ADVANCE = "fsam.<locals>.update_fn.<locals>.advance"  # the state of the next step

MUTANTS = [
  # The moving average and the state, fsam's update.
  mutant(
    "EMA fed the direction d instead of the raw g",
    ADVANCE,
    Replace(
      "clean", "[g - state.sigma * m for g, m in zip(clean, jax.tree.leaves(ema), strict=True)]"
    ),
  ),
  mutant(
    "lambda and 1 - lambda swapped",
    EMA,
    Replace("a * m + (1 - a) * g", "(1 - a) * m + a * g"),
  ),
  mutant("EMA not cast back to its dtype", EMA, Unwrap("(a * m + (1 - a) * g).astype(m.dtype)")),
  mutant(
    "first step decays from m = 0 (the paper's form)",
    "moving_average",
    Replace("0.0", "lmbda"),
  ),
  mutant(
    "first-step rule on the wrong step",
    "moving_average",
    SetConstant(0, 1, within="count == 0"),
  ),
  mutant(
    "count not incremented",
    ADVANCE,
    Unwrap("optax.safe_increment(state.count)", keep="argument"),
  ),
  mutant(
    "EMA of bfloat16/float16 params kept in their dtype, not float32",
    "_zeros_for",
    SetConstant(32, 16),
  ),
  mutant("ema_dtype ignored", "_zeros_for", Replace("ema_dtype or param.dtype", "param.dtype")),
  mutant(
    "non-finite guard inverted (finite steps leave the state unchanged)",
    "advance_if_finite",
    Replace(
      "jax.lax.cond(finite, advance, lambda: state)",
      "jax.lax.cond(finite, lambda: state, advance)",
    ),
  ),
  # Which steps take the SAM step.
  mutant(
    "every=k takes steps 1, k + 1, ... instead of 0, k, ...",
    "device_choice",
    SetConstant(0, 1, within="count % every == 0"),
  ),
  mutant(
    "probability draw compared the wrong way",
    "device_choice",
    SwapOp(ast.Lt, ast.GtE, within="jax.random.uniform(key, dtype=jnp.float32) < probability"),
  ),
  # The direction: both of its spellings (the norm's and the step's), or the step's alone.
  mutant(
    "direction adds the average (sign flip)",
    "FSAMState.direction",
    Replace(F_SAM_NORM, "(g + sigma * m).astype(g.dtype)"),
    Replace(F_SAM_STEP, "(g + sigma * m).astype(g.dtype)"),
  ),
  mutant("sigma ignored", "FSAMState.direction", Replace("step.hyperparam('sigma')", "1.0")),
  mutant(
    "direction from the current gradient instead of the old average",
    "FSAMState.direction",
    Replace("zip(grads, ema, strict=True)", "zip(grads, grads, strict=True)"),
  ),
  mutant("norm of g instead of the direction d", "FSAMState.direction", Replace(F_SAM_NORM, "g")),
  mutant(
    "step along g + sigma m while the norm is of d",
    "FSAMState.direction",
    Replace(F_SAM_STEP, "(g + sigma * m).astype(g.dtype)"),
  ),
  mutant(
    "the step's spelling of the direction adds sigma m",
    "FSAMState.direction",
    SwapOp(ast.USub, ast.UAdd, within=F_SAM_STEP),
  ),
  # The perturbation e = rho d / (||d|| + eps), and theta + e.
  mutant(
    "perturbation subtracted (descent instead of ascent)", "shifted", SwapOp(ast.Add, ast.Sub)
  ),
  mutant("no eps in the division", "perturbation", Replace("norm + eps.astype(acc)", "norm")),
  mutant("rho scaled twice", "perturbation", Replace("rho.astype(acc)", "2 * rho.astype(acc)")),
  mutant(
    "squared norm instead of the norm",
    "global_norm",
    Unwrap("jnp.sqrt(total(squares).astype(acc))", keep="argument"),
  ),
  mutant(
    "norm of the first leaf only (the squared sums not added)",
    "add",
    Replace("sum(kept[1:], kept[0])", "kept[0]"),
  ),
  mutant(
    "per-tensor norm instead of one global norm",
    "perturbation",
    Replace(
      "scale * weighted(p, d, 2)",
      "rho.astype(acc) / (jnp.sqrt(jnp.sum(jnp.square(weighted(p, d, 1)))) + eps.astype(acc))"
      " * weighted(p, d, 2)",
    ),
  ),
  mutant(
    "adaptive perturbation with |theta| instead of theta^2",
    "perturbation",
    Replace("weighted(p, d, 2)", "weighted(p, d, 1)"),
  ),
  mutant(
    "adaptive norm of theta^2 d instead of |theta| d",
    "perturbation",
    Replace("weighted(p, d, 1)", "weighted(p, d, 2)"),
  ),
  mutant("adaptive mode ignored", "perturbation.<locals>.weighted", Replace("adaptive", "False")),
  mutant(
    "perturbation not cast to the params' dtype",
    "perturbation",
    Unwrap("(scale * weighted(p, d, 2)).astype(p.dtype)"),
  ),
  mutant(
    "products in the params' dtype, not at least float32",
    "acc_dtype",
    Replace("jnp.float32", "jnp.float16"),
  ),
]


class Module(NamedTuple):
  path: str  # relative to the repository root
  tree: ast.Module


def parse_package(root: pathlib.Path) -> list[Module]:
  """Every module of the package under ``root``, parsed."""
  paths = sorted((root / PACKAGE).rglob("*.py"))
  return [Module(str(p.relative_to(root)), ast.parse(p.read_text(), str(p))) for p in paths]


def _functions(node: ast.AST, prefix: str = "") -> Iterator[tuple[str, Function]]:
  """The functions under ``node``, with their ``__qualname__``."""
  for child in ast.iter_child_nodes(node):
    if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
      name = prefix + child.name
      yield name, child
      yield from _functions(child, f"{name}.<locals>.")
    elif isinstance(child, ast.ClassDef):
      yield from _functions(child, f"{prefix}{child.name}.")
    else:
      yield from _functions(child, prefix)


def find_function(modules: Sequence[Module], qualname: str) -> tuple[Module, Function]:
  """The one function named ``qualname`` in ``modules``."""
  functions = [(name, m, f) for m in modules for name, f in _functions(m.tree)]
  found = [(m, f) for name, m, f in functions if name == qualname]
  if len(found) > 1:
    where = ", ".join(f"{m.path}:{f.lineno}" for m, f in found)
    raise MutantError(f"function {qualname!r} is defined {len(found)} times ({where})")
  if not found:
    short = qualname.rsplit(".", 1)[-1]
    alike = [f"{name!r} ({m.path})" for name, m, _ in functions if f".{name}".endswith(f".{short}")]
    hint = f"; functions named {short!r}: {', '.join(alike)}" if alike else ""
    raise MutantError(f"no function {qualname!r} in {PACKAGE}/{hint}")
  return found[0]


class _Substitute(ast.NodeTransformer):
  """Replaces the node ``old`` (by identity) with ``new``."""

  def __init__(self, old: ast.AST, new: ast.AST) -> None:
    self.old, self.new = old, new

  def visit(self, node: ast.AST) -> ast.AST:
    return self.new if node is self.old else self.generic_visit(node)


def apply(function: Function, mutation: Mutation) -> None:
  """Makes ``mutation`` inside ``function``, in place."""
  targets = mutation.targets(function)
  if mutation.nth is None and len(targets) != 1:
    raise MutantError(f"{mutation.describe()} occurs {len(targets)} times (expected once)")
  if mutation.nth is not None and not 1 <= mutation.nth <= len(targets):
    raise MutantError(f"{mutation.describe()} occurs {len(targets)} times (wanted #{mutation.nth})")
  target = targets[0 if mutation.nth is None else mutation.nth - 1]
  _Substitute(target, ast.copy_location(mutation.mutate(target), target)).visit(function)
  ast.fix_missing_locations(function)


def mutated(mutant: Mutant, root: pathlib.Path) -> tuple[str, str]:
  """``(path, source)``: the module under ``root`` that holds ``mutant``'s function, mutated."""
  try:
    module, function = find_function(parse_package(root), mutant.function)
    for mutation in mutant.mutations:
      apply(function, mutation)
  except MutantError as error:
    raise SystemExit(
      f"mutant {mutant.name!r} at {mutant.function!r}: {error}.\n"
      "Update its function or mutation in tools/mutate.py to the current source."
    ) from None
  return module.path, ast.unparse(module.tree) + "\n"


def run(mutant: Mutant | None) -> tuple[bool, float]:
  """Runs the property tests against a mutated copy; returns (tests passed, seconds)."""
  with tempfile.TemporaryDirectory(prefix="fsam-mutant-") as tmp:
    root = pathlib.Path(tmp)
    for name in (PACKAGE, "tests"):
      shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("conftest.py", "pyproject.toml"):
      shutil.copy(ROOT / name, root / name)
    if mutant is not None:
      path, source = mutated(mutant, root)
      (root / path).write_text(source)
    start = time.perf_counter()
    result = subprocess.run(
      [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *TESTS],
      cwd=root,
      env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
      capture_output=True,
      text=True,
    )
    return result.returncode == 0, time.perf_counter() - start


def main() -> int:
  parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
  parser.add_argument("-j", "--jobs", type=int, default=2, help="mutants run at once")
  parser.add_argument("-k", default="", help="only mutants whose name contains this")
  parser.add_argument("--min-killed", type=float, default=0.8, help="fraction to pass")
  args = parser.parse_args()
  mutants = [m for m in MUTANTS if args.k in m.name]
  paths = {m.name: mutated(m, ROOT)[0] for m in mutants}  # all checked before anything runs
  passed, seconds = run(None)
  if not passed:
    print("the property tests fail on the unmutated code; fix that first")
    return 1
  print(f"unmutated code: property tests pass ({seconds:.0f} s)")
  killed = 0
  with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
    for m, (survived, seconds) in zip(mutants, pool.map(run, mutants), strict=True):
      killed += not survived
      where = f"{paths[m.name]}:{m.function}"
      print(f"{'SURVIVED' if survived else 'killed  '}  {seconds:5.0f} s  {where}: {m.name}")
  print(f"\n{killed} of {len(mutants)} mutants killed by {' '.join(TESTS)} alone")
  return 0 if killed >= args.min_killed * len(mutants) else 1


if __name__ == "__main__":
  sys.exit(main())
