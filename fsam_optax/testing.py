"""Conformance checks for a SAM-family method: run them on your own method.

A method is a factory that returns an Optax transformation, used as
``fsam_optax.chain(method, base)`` and fed by :func:`fsam_optax.sam_value_and_grad`.
Each check trains a small MLP for a few steps and compares two ways of computing
the same thing: every parallel layout against one device, ``inject_hyperparams``
against the plain factory, micro-batches against the whole batch, and so on.
A check passes by returning ``None``, fails with an ``AssertionError`` whose
message names the method and the property, and is skipped with
``unittest.SkipTest`` (which pytest reports as a skip) when the method lacks
what it needs.

Pass the factory with its hyperparameters bound, as a callable or as an
importable spec, ``"package.module:name"`` or ``"path/to/file.py:name"``. The
checks call it with no arguments, or with the options they need (``mask``,
``skip_nonfinite``), which they use only when the factory's signature takes
them. :func:`check_inject_hyperparams` needs a ``functools.partial`` whose
bound float keywords are the hyperparameters to inject.

Example:
  >>> import functools, fsam_optax
  >>> from fsam_optax import testing
  >>> method = functools.partial(fsam_optax.sam, rho=0.1)
  >>> testing.check_micro_batches(method)
  >>> testing.check_compiles_once(method)

:func:`check_method` runs every check, the parallel layouts in a process of
their own with 8 simulated CPU devices, and returns the skipped checks' reasons:

.. code-block:: python

  skipped = testing.check_method("my_method.py:my_method")
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import os
import pathlib
import subprocess
import sys
import tempfile
import unittest
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import fsam_optax

__all__ = [
  "CHECKS",
  "check_compiles_once",
  "check_extra_args",
  "check_flax_serialization",
  "check_inject_hyperparams",
  "check_layouts",
  "check_loss_scale",
  "check_low_precision",
  "check_method",
  "check_micro_batches",
  "check_orbax_checkpoint",
  "check_skip_nonfinite",
  "load_factory",
]

Factory = Callable[..., optax.GradientTransformation]
Method = str | Factory

STEPS, SIZES, BATCH = 4, (5, 8, 3), 16
LAYOUT_TOL = 1e-9  # float64; the layouts differ in the order of their sums
TOL = 1e-12  # float64; the same sums, in another fusion
LR, MOMENTUM = 0.1, 0.9
DEVICES = 8
# Megatron-style: hidden units split over "model"; the output bias replicated.
MODEL_SPECS = {"w0": P(None, "model"), "b0": P("model"), "w1": P("model", None), "b1": P()}
# FSDP: every large leaf split over "data"; jit gathers it for the matmuls.
FSDP_SPECS = {"w0": P(None, "data"), "b0": P("data"), "w1": P("data", None), "b1": P()}
# Leaves out b0, split over "model", and b1: masked leaves leave the norms of every shard.
MASK = {"w0": True, "b0": False, "w1": True, "b1": False}


class _Run(NamedTuple):
  """Where a few steps of training end: params, optimizer state, the loss of each step."""

  params: Any
  opt_state: Any
  losses: Any


# ---- the public checks ----


def check_layouts(method: Method, *, timeout_s: float = 600.0) -> None:
  """Every parallel layout trains as one device does, in float64.

  In a fresh process with 8 simulated CPU devices: ``shard_map`` over a 1-D
  model mesh (the hidden units split, Megatron-style, with ``param_specs``), over
  a 2-D data x model mesh (also with a ``mask``, if the factory takes one) and
  with ``perturbation="per_device"`` (against a loop over the data replicas on
  one device, what each replica's ``combine`` returns averaged); ``pmap``; FSDP under ``jit``.
  Params, optimizer state and losses must match within 1e-9.

  Args:
    method: an importable spec of the factory, ``"package.module:name"`` or
      ``"path/to/file.py:name"``, which the fresh process imports; the check is
      skipped for a factory given as a callable.
    timeout_s: how long the process may run.

  Raises:
    AssertionError: naming the method and the layout that differs.
  """
  if not isinstance(method, str):
    raise unittest.SkipTest(
      f"{_name(method)}: parallel layouts: a fresh process needs an importable spec of the "
      "factory, 'package.module:name' or 'file.py:name'"
    )
  load_factory(method)  # fails here, not in the process, on a bad spec
  spec = _absolute(method)
  code = "import sys; from fsam_optax import testing; testing._layouts_here(sys.argv[1])"
  try:
    done = subprocess.run(
      [sys.executable, "-c", code, spec],
      env=_device_env(),
      capture_output=True,
      text=True,
      timeout=timeout_s,
    )
  except subprocess.TimeoutExpired:
    raise AssertionError(
      f"{method}: parallel layouts: the process did not finish within {timeout_s:g} s"
    ) from None
  if done.returncode != 0:
    raise AssertionError(f"{method}: parallel layouts: {done.stderr.strip()[-4000:]}")


def check_compiles_once(method: Method) -> None:
  """The jitted step traces once over several steps: the state keeps its types and shapes."""
  _run(method, "the jitted step compiles once", _compiles_once)


def check_extra_args(method: Method) -> None:
  """``update`` accepts extra keyword arguments it does not know, and ignores them."""
  _run(method, "update ignores unknown extra arguments", _extra_args)


def check_inject_hyperparams(method: Method) -> None:
  """Under ``optax.inject_hyperparams`` the method trains as the plain factory does, and
  follows hyperparameters changed in the state.

  The factory must be a ``functools.partial``; its bound float keywords are
  injected, the others are ``static_args``. Halving every injected value in the
  state after ``init`` must give the plain factory built with the halved values.
  """
  _run(method, "inject_hyperparams", _inject_hyperparams)


def check_skip_nonfinite(method: Method) -> None:
  """With ``skip_nonfinite=True`` and ``optax.apply_if_finite``, a step on a non-finite batch
  leaves params and the method's state unchanged, and training goes on as if it never came.
  """
  _run(method, "skip_nonfinite", _skip_nonfinite)


def check_micro_batches(method: Method) -> None:
  """``micro_batches=4`` trains as the whole batch does, within 1e-12 in float64."""
  _run(method, "micro_batches", _micro_batches)


def check_loss_scale(method: Method) -> None:
  """A float32 loss scale (a power of two) changes nothing beyond rounding (1e-12 in float64)."""
  _run(method, "loss_scale", _loss_scale)


def check_low_precision(method: Method) -> None:
  """With bfloat16 params, the method's state is float32, the updates are bfloat16 and
  finite, and the state keeps its dtypes."""
  _run(method, "bfloat16 params", _low_precision, x64=False)


def check_flax_serialization(method: Method) -> None:
  """``flax.serialization`` restores the optimizer state exactly, and training resumes as if
  never stopped."""
  _run(method, "flax.serialization round trip", _flax_serialization)


def check_orbax_checkpoint(method: Method) -> None:
  """Orbax restores the optimizer state exactly onto the abstract target of ``init``, and
  training resumes as if never stopped."""
  _run(method, "Orbax round trip", _orbax_checkpoint)


CHECKS: Mapping[str, Callable[[Method], None]] = {
  "compiles_once": check_compiles_once,
  "extra_args": check_extra_args,
  "inject_hyperparams": check_inject_hyperparams,
  "skip_nonfinite": check_skip_nonfinite,
  "micro_batches": check_micro_batches,
  "loss_scale": check_loss_scale,
  "low_precision": check_low_precision,
  "flax_serialization": check_flax_serialization,
  "orbax_checkpoint": check_orbax_checkpoint,
  "layouts": check_layouts,
}
"""Every check by name, for ``pytest.mark.parametrize``."""


def check_method(method: Method) -> dict[str, str]:
  """Runs every check of :data:`CHECKS` on ``method``, stopping at the first failure.

  Args:
    method: the factory with its hyperparameters bound, or an importable spec
      of it (the parallel layouts need a spec).

  Returns:
    The reason each skipped check was skipped, by name; empty when all ran.

  Raises:
    AssertionError: naming the method and the property that failed.
  """
  skipped = {}
  for name, check in CHECKS.items():
    try:
      check(method)
    except unittest.SkipTest as skip:
      skipped[name] = str(skip)
  return skipped


def load_factory(spec: str) -> Factory:
  """The factory that ``spec`` names: ``"package.module:name"`` or ``"path/to/file.py:name"``."""
  where, sep, name = spec.rpartition(":")
  if not sep or not where or not name:
    raise ValueError(f"a method spec is 'package.module:name' or 'file.py:name', got {spec!r}")
  if where.endswith(".py"):
    path = pathlib.Path(where).resolve()
    module_spec = importlib.util.spec_from_file_location(path.stem, path)
    if module_spec is None or module_spec.loader is None:
      raise ValueError(f"cannot load {path} as a Python file")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
  else:
    module = importlib.import_module(where)
  return getattr(module, name)


# ---- running a check ----


def _run(method: Method, prop: str, body: Callable[[Factory], None], x64: bool = True) -> None:
  """Runs ``body`` on the factory; any failure becomes an ``AssertionError`` naming both."""
  factory = load_factory(method) if isinstance(method, str) else method
  name = method if isinstance(method, str) else _name(factory)
  try:
    with jax.enable_x64(x64):
      body(factory)
  except unittest.SkipTest as skip:
    raise unittest.SkipTest(f"{name}: {prop}: {skip}") from None
  except AssertionError as failure:
    raise AssertionError(f"{name}: {prop}: {failure}") from None
  except Exception as error:
    raise AssertionError(f"{name}: {prop}: raised {type(error).__name__}: {error}") from error


def _name(factory: Factory) -> str:
  func = factory.func if isinstance(factory, functools.partial) else factory
  return getattr(func, "__qualname__", repr(func))


def _takes(factory: Factory, option: str) -> bool:
  """Whether the factory takes the keyword ``option`` (or any keyword)."""
  params = inspect.signature(factory).parameters
  return option in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _needs(factory: Factory, option: str) -> None:
  if not _takes(factory, option):
    raise unittest.SkipTest(f"the factory takes no `{option}`")


def _chain(factory: Factory, **options: Any) -> optax.GradientTransformation:
  return fsam_optax.chain(factory(**options), optax.sgd(LR, momentum=MOMENTUM))


# ---- the problem: a small MLP, in float64 unless the check says otherwise ----


def _mlp_loss(params: Mapping[str, jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
  """Mean squared error of a one-hidden-layer tanh MLP, computed in at least float32."""
  params = {k: v.astype(jnp.promote_types(v.dtype, jnp.float32)) for k, v in params.items()}
  h = jnp.tanh(x @ params["w0"] + params["b0"][None, :])
  return jnp.mean((h @ params["w1"] + params["b1"][None, :] - y) ** 2)


def _megatron_loss(params: Mapping[str, jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
  """``_mlp_loss`` with the hidden units split over ``"model"``, inside ``shard_map``."""
  h = jnp.tanh(x @ params["w0"] + params["b0"][None, :])
  out = jax.lax.psum(h @ params["w1"], "model") + params["b1"][None, :]
  return jnp.mean((out - y) ** 2)


def _fsdp_loss(params: Mapping[str, jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
  """``_mlp_loss`` of params sharded under ``jit`` on an Explicit mesh, gathered first."""
  return _mlp_loss({k: jax.sharding.reshard(v, P()) for k, v in params.items()}, x, y)


def _init(dtype: Any = None) -> dict[str, jax.Array]:
  rng = np.random.default_rng(0)
  n_in, hidden, n_out = SIZES
  params = {
    "w0": rng.normal(size=(n_in, hidden)) / np.sqrt(n_in),
    "b0": 0.1 * rng.normal(size=hidden),
    "w1": rng.normal(size=(hidden, n_out)) / np.sqrt(hidden),
    "b1": 0.1 * rng.normal(size=n_out),
  }
  return {k: jnp.asarray(v, dtype) for k, v in params.items()}


def _batches(steps: int = STEPS) -> list[tuple[jax.Array, jax.Array]]:
  rng = np.random.default_rng(1)
  out = []
  for _ in range(steps):
    x = rng.normal(size=(BATCH, SIZES[0]))
    y = np.sin(x @ np.linspace(-1.0, 1.0, SIZES[0] * SIZES[2]).reshape(SIZES[0], SIZES[2]))
    out.append((jnp.asarray(x), jnp.asarray(y)))
  return out


def _step(
  tx: optax.GradientTransformation, loss: Callable[..., jax.Array] = _mlp_loss, **grad_kwargs: Any
) -> Callable[..., tuple[Any, Any, jax.Array]]:
  """One training step: the helper's gradients, ``tx.update``, the updates applied."""
  grad_fn = fsam_optax.sam_value_and_grad(loss, **grad_kwargs)

  def step(params: Any, opt_state: Any, x: jax.Array, y: jax.Array, **kwargs: Any) -> Any:
    value, grads = grad_fn(params, opt_state, x, y, **kwargs)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  return step


def _train(
  step: Callable[..., Any],
  params: Any,
  opt_state: Any,
  batches: list[tuple[jax.Array, jax.Array]],
  place: Callable[[Any], Any] = lambda batch: batch,
  **kwargs: Any,
) -> _Run:
  losses = []
  for batch in batches:
    params, opt_state, loss = step(params, opt_state, *place(batch), **kwargs)
    losses.append(loss)
  return _Run(params, opt_state, jnp.stack(losses))


def _one_device(factory: Factory, **options: Any) -> _Run:
  tx, params = _chain(factory, **options), _init()
  return _train(jax.jit(_step(tx)), params, tx.init(params), _batches())


@functools.lru_cache(maxsize=4)
def _plain(factory: Factory) -> tuple[optax.GradientTransformation, Callable[..., Any]]:
  """The chain of ``factory`` and its jitted step, which several checks share."""
  tx = _chain(factory)
  return tx, jax.jit(_step(tx))


@functools.lru_cache(maxsize=4)
def _plain_run(factory: Factory) -> _Run:
  """``_one_device(factory)`` in float64, which several checks compare with."""
  tx, step = _plain(factory)
  return _train(step, _init(), tx.init(_init()), _batches())


def _assert_close(got: Any, want: Any, tol: float, what: str) -> None:
  """``got`` has the structure, shapes and dtypes of ``want``, and values within ``tol``.

  Raises:
    AssertionError: naming ``what`` and the first leaf that differs.
  """
  got_leaves, got_def = jax.tree_util.tree_flatten_with_path(got)
  want_leaves, want_def = jax.tree_util.tree_flatten_with_path(want)
  if got_def != want_def:  # type: ignore[operator]  # PyTreeDef's stub lacks __ne__
    raise AssertionError(f"{what}: the trees differ: {got_def} against {want_def}")
  for (path, g), (_, w) in zip(got_leaves, want_leaves, strict=True):
    g, w, where = np.asarray(g), np.asarray(w), jax.tree_util.keystr(path)
    if (g.shape, g.dtype) != (w.shape, w.dtype):
      raise AssertionError(f"{what}: {where} is {g.dtype}{g.shape}, not {w.dtype}{w.shape}")
    diff = np.max(np.abs(g.astype(np.float64) - w.astype(np.float64)), initial=0.0)
    if not diff <= tol:
      raise AssertionError(f"{what}: {where} differs by {diff:.3g} (tolerance {tol:g})")


# ---- single-device checks ----


def _compiles_once(factory: Factory) -> None:
  tx, params = _chain(factory), _init()
  traces: list[None] = []
  inner = _step(tx)

  def counted(*args: Any) -> Any:
    traces.append(None)
    return inner(*args)

  _train(jax.jit(counted), params, tx.init(params), _batches())
  assert len(traces) == 1, f"{len(traces)} traces in {STEPS} steps: the state changes type"


def _extra_args(factory: Factory) -> None:
  tx, params = _chain(factory), _init()
  grad_fn = fsam_optax.sam_value_and_grad(_mlp_loss)

  @jax.jit
  def updates(params: Any, opt_state: Any, x: jax.Array, y: jax.Array) -> Any:
    _, grads = grad_fn(params, opt_state, x, y)
    plain = tx.update(grads, opt_state, params)
    return plain, tx.update(grads, opt_state, params, unknown_extra_arg=jnp.ones(3))

  plain, extra = updates(params, tx.init(params), *_batches(1)[0])
  _assert_close(extra, plain, 0.0, "the updates and state with an extra argument")


def _inject_hyperparams(factory: Factory) -> None:
  if not isinstance(factory, functools.partial):
    raise unittest.SkipTest("bind the hyperparameters with functools.partial to inject them")
  bound = inspect.signature(factory.func).bind_partial(*factory.args, **factory.keywords)
  values = dict(bound.arguments)
  floats = [k for k, v in values.items() if isinstance(v, float)]
  if not floats:
    raise unittest.SkipTest("the partial binds no float hyperparameter")
  static = tuple(k for k in values if k not in floats)
  injected = optax.inject_hyperparams(factory.func, static_args=static)
  base = optax.sgd(LR, momentum=MOMENTUM)
  tx = fsam_optax.chain(injected(**values), base)
  step, params = jax.jit(_step(tx)), _init()
  got = _train(step, params, tx.init(params), _batches())
  plain = _plain_run(factory)
  _assert_close(
    (got.params, got.losses), (plain.params, plain.losses), TOL, "as given, against the plain one"
  )
  halved = {**values, **{k: values[k] / 2 for k in floats}}
  opt_state = tx.init(params)
  for k in floats:
    opt_state[0].hyperparams[k] = jnp.asarray(halved[k], opt_state[0].hyperparams[k].dtype)
  got = _train(step, params, opt_state, _batches())
  want = _one_device(functools.partial(factory.func, **halved))
  _assert_close(
    (got.params, got.losses), (want.params, want.losses), TOL, f"with {floats} halved in the state"
  )
  moved = np.max(np.abs(np.asarray(got.params["w0"]) - np.asarray(plain.params["w0"])))
  assert moved > 1e-6, f"halving {floats} changed nothing: the method does not read them"


def _skip_nonfinite(factory: Factory) -> None:
  _needs(factory, "skip_nonfinite")
  tx = fsam_optax.chain(
    factory(skip_nonfinite=True), optax.apply_if_finite(optax.sgd(LR, momentum=MOMENTUM), 3)
  )
  step, params = jax.jit(_step(tx)), _init()
  batches = _batches()
  bad = (jnp.full_like(batches[1][0], jnp.nan), batches[1][1])
  clean = _train(step, params, tx.init(params), batches)
  before = _train(step, params, tx.init(params), batches[:1])
  params, opt_state, _ = step(before.params, before.opt_state, *bad)
  _assert_close(
    (params, opt_state[0]), (before.params, before.opt_state[0]), 0.0, "on the non-finite step"
  )
  resumed = _train(step, params, opt_state, batches[1:])
  _assert_close(
    (resumed.params, resumed.opt_state[0]),
    (clean.params, clean.opt_state[0]),
    0.0,
    "after the non-finite step, against a run without it",
  )


def _micro_batches(factory: Factory) -> None:
  tx, params = _chain(factory), _init()
  got = _train(jax.jit(_step(tx, micro_batches=4)), params, tx.init(params), _batches())
  _assert_close(got, _plain_run(factory), TOL, "4 micro-batches against the whole batch")


def _loss_scale(factory: Factory) -> None:
  tx, params = _chain(factory), _init()
  step = jax.jit(_step(tx))
  got = _train(step, params, tx.init(params), _batches(), loss_scale=jnp.float32(1024.0))
  _assert_close(got, _plain_run(factory), TOL, "a loss scale of 1024 against none")


def _low_precision(factory: Factory) -> None:
  tx, params = _chain(factory), _init(jnp.bfloat16)
  opt_state = tx.init(params)
  for path, leaf in jax.tree_util.tree_leaves_with_path(opt_state[0]):
    if jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.dtype != jnp.float32:
      raise AssertionError(f"the state's {jax.tree_util.keystr(path)} is {leaf.dtype}, not float32")
  dtypes = jax.tree.map(lambda a: a.dtype, opt_state)
  grad_fn = fsam_optax.sam_value_and_grad(_mlp_loss)

  @jax.jit
  def step(params: Any, opt_state: Any, x: jax.Array, y: jax.Array) -> Any:
    _, grads = grad_fn(params, opt_state, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, updates

  for x, y in _batches():
    batch = (x.astype(jnp.bfloat16), y.astype(jnp.bfloat16))
    params, opt_state, updates = step(params, opt_state, *batch)
    for path, u in jax.tree_util.tree_leaves_with_path(updates):
      where = jax.tree_util.keystr(path)
      assert u.dtype == jnp.bfloat16, f"the update of {where} is {u.dtype}, not bfloat16"
      assert bool(jnp.all(jnp.isfinite(u))), f"the update of {where} is not finite"
    got = jax.tree.map(lambda a: a.dtype, opt_state)
    assert got == dtypes, f"the state's dtypes changed: {got} from {dtypes}"


def _save_and_resume(
  factory: Factory, round_trip: Callable[[Any, Any], Any], what: str, at: int = 2
) -> None:
  """Trains ``at`` steps, restores the state with ``round_trip(saved, target)`` onto a fresh
  optimizer's ``init``, and checks the restored state and the rest of the run."""
  (tx, step), params, batches = _plain(factory), _init(), _batches()
  saved = _train(step, params, tx.init(params), batches[:at])
  fresh = _chain(factory)
  restored = round_trip(saved.opt_state, fresh.init(jax.tree.map(jnp.zeros_like, params)))
  _assert_close(restored, saved.opt_state, 0.0, f"the state restored by {what}")
  want = _train(step, saved.params, saved.opt_state, batches[at:])
  got = _train(step, saved.params, restored, batches[at:])
  _assert_close(got, want, 0.0, f"training resumed from {what}")


def _flax_serialization(factory: Factory) -> None:
  if importlib.util.find_spec("flax") is None:
    raise unittest.SkipTest("flax is not installed")
  from flax import serialization

  def round_trip(saved: Any, target: Any) -> Any:
    return serialization.from_bytes(target, serialization.to_bytes(saved))

  _save_and_resume(factory, round_trip, "flax.serialization")


def _orbax_checkpoint(factory: Factory) -> None:
  if importlib.util.find_spec("orbax") is None:
    raise unittest.SkipTest("orbax-checkpoint is not installed")
  import orbax.checkpoint as ocp

  def round_trip(saved: Any, target: Any) -> Any:
    with tempfile.TemporaryDirectory() as tmp, ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(pathlib.Path(tmp) / "state", saved)
      checkpointer.wait_until_finished()
      abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
      return checkpointer.restore(pathlib.Path(tmp) / "state", abstract)

  _save_and_resume(factory, round_trip, "Orbax")


# ---- the parallel layouts, in a process with 8 devices ----


def _device_env() -> dict[str, str]:
  """This process's environment and import path, with 8 CPU devices and float64."""
  flags = [
    f
    for f in os.environ.get("XLA_FLAGS", "").split()
    if not f.startswith("--xla_force_host_platform_device_count")
  ]
  path = [str(pathlib.Path(p or os.getcwd()).resolve()) for p in sys.path]
  return {
    **os.environ,
    "XLA_FLAGS": " ".join([*flags, f"--xla_force_host_platform_device_count={DEVICES}"]),
    "JAX_PLATFORMS": "cpu",
    "JAX_ENABLE_X64": "1",
    "PYTHONPATH": os.pathsep.join([str(pathlib.Path(__file__).parents[1]), *path]),
  }


def _absolute(spec: str) -> str:
  where, _, name = spec.rpartition(":")
  return f"{pathlib.Path(where).resolve()}:{name}" if where.endswith(".py") else spec


def _layouts_here(spec: str) -> None:
  """The body of :func:`check_layouts`, in the process it starts; exits 1 on a failure."""
  if jax.device_count() < DEVICES:
    sys.exit(f"{jax.device_count()} devices, not {DEVICES}: JAX started before XLA_FLAGS was set")
  with jax.enable_x64(True):
    for what, got, want in _layout_runs(load_factory(spec)):
      try:
        _assert_close(got(), want(), LAYOUT_TOL, f"{what}, against one device")
      except AssertionError as failure:
        sys.exit(str(failure))
      except Exception as error:
        sys.exit(f"{what}: raised {type(error).__name__}: {error}")


def _layout_runs(factory: Factory) -> Iterator[tuple[str, Callable[[], _Run], Callable[[], _Run]]]:
  """Each layout's run and the one-device run it must equal, as thunks."""
  one_device = functools.cache(lambda: _one_device(factory))
  yield "the 1-D model mesh", lambda: _shard_map_run(factory, (4,), ("model",)), one_device
  data_by_model = ((2, 4), ("data", "model"))
  yield "the 2-D data x model mesh", lambda: _shard_map_run(factory, *data_by_model), one_device
  if _takes(factory, "mask"):
    masked = lambda: _shard_map_run(factory, *data_by_model, mask=MASK)
    yield "the masked 2-D mesh", masked, lambda: _one_device(factory, mask=MASK)
  per_device = lambda: _shard_map_run(factory, *data_by_model, perturbation="per_device")
  replicas = lambda: _replica_loop(factory, replicas=2)
  yield "per_device on the 2-D mesh (a loop over the replicas)", per_device, replicas
  yield "pmap", lambda: _pmap_run(factory), one_device
  yield "FSDP under jit", lambda: _fsdp_run(factory), one_device


def _place(mesh: jax.sharding.Mesh, tree: Any, specs: Any) -> Any:
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=_is_spec)
  return jax.device_put(tree, jax.tree.broadcast(shardings, tree, is_leaf=_is_spec))


def _is_spec(x: Any) -> bool:
  return isinstance(x, P)


def _shard_map_run(
  factory: Factory,
  shape: tuple[int, ...],
  names: tuple[str, ...],
  perturbation: str = "global",
  **options: Any,
) -> _Run:
  mesh = jax.make_mesh(shape, names, axis_types=(AxisType.Explicit,) * len(names))
  model_parallel = "model" in names
  data_axis = "data" if "data" in names else None
  tx, params = _chain(factory, **options), _init()
  specs = MODEL_SPECS if model_parallel else P()
  state_specs = fsam_optax.opt_state_shardings(tx, params, specs)
  step = _step(
    tx,
    _megatron_loss if model_parallel else _mlp_loss,
    axis_name=data_axis,
    perturbation=perturbation,
    param_specs=MODEL_SPECS if model_parallel else None,
  )
  mapped = jax.shard_map(
    step,
    mesh=mesh,
    in_specs=(specs, state_specs, P(data_axis), P(data_axis)),
    out_specs=(specs, state_specs, P()),
  )
  place = lambda batch: _place(mesh, batch, P(data_axis))
  return _train(
    jax.jit(mapped), _place(mesh, params, specs), _place(mesh, tx.init(params), state_specs),
    _batches(), place,
  )  # fmt: skip


def _replica_loop(factory: Factory, replicas: int) -> _Run:
  """Per device on one device: each replica's ``SAMGrad`` tree from its rows, then the mean."""
  tx, params = _chain(factory), _init()
  grad_fn = fsam_optax.sam_value_and_grad(_mlp_loss)

  @jax.jit
  def step(params: Any, opt_state: Any, x: jax.Array, y: jax.Array) -> Any:
    rows = zip(jnp.split(x, replicas), jnp.split(y, replicas), strict=True)
    losses, grads = zip(*(grad_fn(params, opt_state, xs, ys) for xs, ys in rows), strict=True)
    mean = jax.tree.map(lambda *leaves: sum(leaves) / replicas, *grads)
    updates, opt_state = tx.update(mean, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, sum(losses) / replicas

  return _train(step, params, tx.init(params), _batches())


def _pmap_run(factory: Factory) -> _Run:
  """``pmap`` over the 8 devices; every device must hold the same run, which this returns."""
  tx, params = _chain(factory), _init()
  step = jax.pmap(_step(tx, axis_name="data"), axis_name="data")
  stack = lambda tree: jax.tree.map(lambda a: jnp.broadcast_to(a, (DEVICES, *a.shape)), tree)
  split = lambda batch: tuple(a.reshape(DEVICES, -1, a.shape[-1]) for a in batch)
  run = _train(step, stack(params), stack(tx.init(params)), _batches(), split)
  first = jax.tree.map(lambda a: a[0], _Run(run.params, run.opt_state, run.losses.T))
  every = (run.params, run.opt_state, run.losses.T)
  _assert_close(every, stack(tuple(first)), 0.0, "pmap's run on every device")
  return first


def _fsdp_run(factory: Factory) -> _Run:
  mesh = jax.make_mesh((DEVICES,), ("data",), axis_types=(AxisType.Explicit,))
  tx, params = _chain(factory), _init()
  with jax.set_mesh(mesh):
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), FSDP_SPECS, is_leaf=_is_spec)
    state_shardings = fsam_optax.opt_state_shardings(tx, params, shardings)
    step = jax.jit(
      _step(tx, _fsdp_loss), out_shardings=(shardings, state_shardings, NamedSharding(mesh, P()))
    )
    run = _train(
      step,
      jax.device_put(params, shardings),
      jax.device_put(tx.init(params), state_shardings),
      _batches(),
      lambda batch: _place(mesh, batch, P("data")),
    )
  return jax.device_get(run)
