"""The SAM-or-one-pass choice made on the host: ``sam_step=`` and ``fsam_optax.is_sam_step``.

Specification: ``sam_step=True`` compiles the two-pass step alone and
``sam_step=False`` the method's one-pass step alone (the base optimizer gets
``g``; F-SAM's and VaSSO's averages are fed ``g``; LookSAM reuses its ``g_v``),
neither with a conditional from the schedule; ``is_sam_step(opt_state, i)`` is the
state's own rule for update ``i``, decided from its static settings alone; a run
whose choices come from the host equals the device-side schedule's run, step for
step, in float64, on one device and on a data-parallel mesh, and under every
framework's ``jit``.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import fsam_optax
from tests import reference as ref
from tests.jax_mlp import METHOD_PAIRS, max_abs_diff, mlp_loss

LR, MOMENTUM = 0.05, 0.9
STEPS = 15
TOL = 1e-12
N_DEV = 8
# Two-pass and one-pass steps, in an order no schedule gives (two one-pass steps first).
TAKE = [False, False, True, True, False, True, False, False, False, True, True, False]

SCHEDULES = {
  "fsam every=2": lambda: fsam_optax.fsam(rho=0.2, sigma=1.0, lmbda=0.6, every=2),
  "fsam probability=0.5": lambda: fsam_optax.fsam(
    rho=0.2, sigma=1.0, lmbda=0.6, probability=0.5, seed=7
  ),
  "looksam every=5": lambda: fsam_optax.looksam(rho=0.2, every=5, alpha=0.7),
}


def train_step(tx: optax.GradientTransformation, **grad_kwargs):
  """``(params, opt_state, x, y, sam_step) -> (params, opt_state)``, not yet compiled."""
  grad_fn = fsam_optax.sam_value_and_grad(mlp_loss, **grad_kwargs)

  def step(params, opt_state, x, y, sam_step=None):
    _, grads = grad_fn(params, opt_state, x, y, sam_step=sam_step)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return step


def run(step, tx, data, choose, place=lambda tree, batch=False: tree):
  """The MLP trained on ``data``; ``choose(opt_state, i)`` gives each step's ``sam_step``."""
  params = jax.tree.map(jnp.asarray, ref.init_mlp(0))
  params, opt_state = place(params), place(tx.init(params))
  path = []
  for i, (x, y) in enumerate(data):
    params, opt_state = step(params, opt_state, *place((x, y), batch=True), choose(opt_state, i))
    path.append(params)
  return path, opt_state


def host(opt_state, i):
  return fsam_optax.is_sam_step(opt_state, i)


def device(opt_state, i):
  del opt_state, i
  return None


def assert_trees_close(a, b, tol=TOL):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=tol)


# ---- Exact: forced choices against the NumPy references ----


@pytest.mark.parametrize("method", list(METHOD_PAIRS))
def test_forced_choices_equal_the_numpy_reference_in_float64(method):
  make, make_ref = METHOD_PAIRS[method]
  with jax.enable_x64(True):
    data = ref.batches(seed=3, steps=len(TAKE))
    tx = optax.chain(make(), optax.sgd(LR, momentum=MOMENTUM))
    step = jax.jit(train_step(tx), static_argnames="sam_step")
    path, state = run(step, tx, data, lambda s, i: TAKE[i])
    want = ref.train_family(
      make_ref(), ref.SGDReference(LR, MOMENTUM, 0.0), ref.init_mlp(0), data, take=TAKE
    )
    assert path[-1]["w0"].dtype == jnp.float64
    assert max(max_abs_diff(got, w) for got, w in zip(path, want, strict=True)) < TOL
    assert int(state[0].count) == len(TAKE)


# A large eps, so that a one-pass step that ran the two-pass rules on (g, g) would not
# round to g (GSAM's combination of g with itself is g only up to eps).
ONE_PASS = {
  "fsam": lambda: fsam_optax.fsam(rho=0.2, sigma=1.0, lmbda=0.6, eps=0.1),
  "sam": lambda: fsam_optax.sam(rho=0.1, eps=0.1),
  "gsam": lambda: fsam_optax.gsam(rho=0.2, alpha=0.4, eps=0.1),
  "vasso": lambda: fsam_optax.vasso(rho=0.2, theta=0.4, eps=0.1),
  "looksam": lambda: fsam_optax.looksam(rho=0.2, every=5, alpha=0.7, eps=0.1),
}


@pytest.mark.parametrize("method", list(ONE_PASS))
def test_a_one_pass_step_hands_the_base_optimizer_g_exactly(method):
  tx = optax.chain(ONE_PASS[method](), optax.sgd(1.0))
  params = jax.tree.map(jnp.asarray, ref.init_mlp(0))
  x, y = ref.batches(seed=4, steps=1)[0]
  opt_state = tx.init(params)
  grad_fn = fsam_optax.sam_value_and_grad(mlp_loss, return_diagnostics=True)
  grad_fn = jax.jit(grad_fn, static_argnames="sam_step")
  value, grads, diag = grad_fn(params, opt_state, x, y, sam_step=False)
  g = jax.jit(jax.grad(mlp_loss))(params, x, y)
  updates, new_state = tx.update(grads, opt_state, params)
  for k in g:
    np.testing.assert_array_equal(updates[k], -g[k])
  assert float(diag.perturbation_norm) == 0.0
  assert float(diag.perturbed_value) == float(value)
  assert int(new_state[0].count) == 1


# ---- Exact: the host's schedule against the device's ----


def _data_mesh():
  return jax.make_mesh((N_DEV,), ("data",))


def _on_mesh(tree, batch=False):
  """The batch split over the data axis, the rest replicated (spelt as jit's outputs are)."""
  mesh = _data_mesh()
  spec = lambda a: P("data") if batch else P(*[None] * jnp.ndim(a))
  return jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, spec(a))), tree)


def _jit(tx):
  return jax.jit(train_step(tx), static_argnames="sam_step")


def _shard_map(tx):
  inner = train_step(tx, axis_name="data")
  specs = dict(mesh=_data_mesh(), in_specs=(P(), P(), P("data"), P("data")), out_specs=P())

  @functools.partial(jax.jit, static_argnames="sam_step")
  def step(params, opt_state, x, y, sam_step=None):
    mapped = jax.shard_map(functools.partial(inner, sam_step=sam_step), **specs)
    return mapped(params, opt_state, x, y)

  return step


LAYOUTS = {
  "one device": (_jit, lambda tree, batch=False: tree),
  "jit, batch split over 8 devices": (_jit, _on_mesh),
  "shard_map over 8 devices": (_shard_map, _on_mesh),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_host_choices_equal_the_device_schedule_step_for_step(schedule, layout):
  build, place = LAYOUTS[layout]
  with jax.enable_x64(True):
    data = ref.batches(seed=5, steps=STEPS)
    tx = optax.chain(SCHEDULES[schedule](), optax.sgd(LR, momentum=MOMENTUM))
    step = build(tx)
    by_host, host_state = run(step, tx, data, host, place)
    on_device, device_state = run(step, tx, data, device, place)
    taken = [fsam_optax.is_sam_step(host_state, i) for i in range(STEPS)]
    assert any(taken) and not all(taken)  # both kinds of step were compared
    for got, want in zip(by_host, on_device, strict=True):
      assert_trees_close(got, want)
    assert_trees_close(host_state, device_state)
    assert int(host_state[0].count) == STEPS
  assert step._cache_size() == 3  # the host's two programs and the device's one


def _replicated(tree, batch=False):
  """For ``pmap``: the batch split into one slice a device, the rest copied to each."""
  if batch:
    return jax.tree.map(lambda a: a.reshape(N_DEV, -1, *a.shape[1:]), tree)
  # Placed as pmap places its outputs, so that the second step sees what the first saw.
  return jax.pmap(lambda t: t, axis_name="data")(
    jax.tree.map(lambda a: jnp.stack([a] * N_DEV), tree)
  )


def test_the_host_choice_under_pmap_equals_the_device_schedule():
  traces = []

  def traced(params, opt_state, x, y, sam_step):
    traces.append(sam_step)
    return train_step(tx, axis_name="data")(params, opt_state, x, y, sam_step)

  with jax.enable_x64(True):
    data = ref.batches(seed=7, steps=STEPS)
    tx = optax.chain(SCHEDULES["fsam probability=0.5"](), optax.sgd(LR, momentum=MOMENTUM))
    step = jax.pmap(traced, axis_name="data", static_broadcasted_argnums=(4,))
    by_host, host_state = run(step, tx, data, host, _replicated)
    on_device, device_state = run(step, tx, data, device, _replicated)
  assert sorted(traces, key=str) == [False, None, True]  # one trace for each choice
  for got, want in zip(by_host, on_device, strict=True):
    assert_trees_close(got, want)
  assert_trees_close(host_state, device_state)


# ---- The host's rule is the device's ----


def device_decisions(tx: optax.GradientTransformation, steps: int) -> np.ndarray:
  """Which of ``steps`` updates took the SAM step, read from a run's diagnostics."""
  params = {"w": jnp.array([1.0, -2.0])}
  grad_fn = fsam_optax.sam_value_and_grad(lambda p: jnp.sum(p["w"] ** 2), return_diagnostics=True)

  def body(carry, _):
    params, opt_state = carry
    _, grads, diag = grad_fn(params, opt_state)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), diag.perturbation_norm > 0

  _, taken = jax.jit(lambda c: jax.lax.scan(body, c, length=steps))((params, tx.init(params)))
  return np.asarray(taken)


RULES = {
  "every step": lambda: fsam_optax.fsam(),
  "every=3": lambda: fsam_optax.fsam(every=3),
  "probability=0.3, seed=5": lambda: fsam_optax.fsam(probability=0.3, seed=5),
  "sam probability=0.7, largest seed": lambda: fsam_optax.sam(probability=0.7, seed=2**32 - 1),
  "looksam every=5": lambda: fsam_optax.looksam(every=5),
  "gsam (no schedule)": lambda: fsam_optax.gsam(),
}


@pytest.mark.parametrize("rule", list(RULES))
def test_is_sam_step_equals_the_device_decisions_over_1000_counts(rule):
  tx = optax.chain(RULES[rule](), optax.sgd(1e-3))
  opt_state = tx.init({"w": jnp.zeros(2)})
  on_device = device_decisions(tx, 1000)
  by_host = np.array([fsam_optax.is_sam_step(opt_state, i) for i in range(1000)])
  np.testing.assert_array_equal(by_host, on_device)
  assert all(type(fsam_optax.is_sam_step(opt_state, i)) is bool for i in (0, 1))


def test_the_draws_ignore_the_default_prng_and_cross_blocks():
  tx = optax.chain(fsam_optax.fsam(probability=0.5, seed=11), optax.sgd(1e-3))
  opt_state = tx.init({"w": jnp.zeros(2)})
  counts = range(4090, 4110)  # across the host's blocks of 4096 draws
  threefry = [fsam_optax.is_sam_step(opt_state, i) for i in counts]
  previous = jax.config.jax_default_prng_impl
  jax.config.update("jax_default_prng_impl", "rbg")
  try:
    rbg_state = tx.init({"w": jnp.zeros(2)})
    assert [fsam_optax.is_sam_step(rbg_state, i) for i in counts] == threefry
    decide = jax.jit(
      lambda c: (
        fsam_optax.sam_value_and_grad(lambda p: jnp.sum(p["w"] ** 2), return_diagnostics=True)(
          {"w": jnp.ones(2)}, (rbg_state[0]._replace(count=c), rbg_state[1])
        )[2].perturbation_norm
        > 0
      )
    )
    assert [bool(decide(jnp.int32(i))) for i in counts] == threefry
  finally:
    jax.config.update("jax_default_prng_impl", previous)


def test_is_sam_step_reads_no_array_of_the_state():
  tx = optax.chain(fsam_optax.fsam(probability=0.4, seed=3), optax.sgd(0.1, momentum=0.9))
  opt_state, fresh = tx.init({"w": jnp.zeros(3)}), tx.init({"w": jnp.zeros(3)})
  before = [fsam_optax.is_sam_step(opt_state, i) for i in range(50)]
  for leaf in jax.tree.leaves(opt_state):
    leaf.delete()
  assert all(leaf.is_deleted() for leaf in jax.tree.leaves(opt_state))
  assert [fsam_optax.is_sam_step(opt_state, i) for i in range(50)] == before
  later = range(10_000, 10_050)  # draws the host has not made yet
  assert [fsam_optax.is_sam_step(opt_state, i) for i in later] == [
    fsam_optax.is_sam_step(fresh, i) for i in later
  ]


# ---- What is compiled ----


def _ops(compiled_text: str) -> tuple[int, int]:
  """The dot and convolution ops, and the conditionals, of an optimized HLO module."""
  dots = len(re.findall(r"= \S+ (?:dot|convolution)\(", compiled_text))
  return dots, len(re.findall(r" conditional\(", compiled_text))


def _compiled(step, *args, **kwargs) -> str:
  return step.lower(*args, **kwargs).compile().as_text()


@pytest.mark.parametrize(
  "make",
  [*(pair[0] for pair in METHOD_PAIRS.values()), *SCHEDULES.values()],
  ids=[*METHOD_PAIRS, *SCHEDULES],
)
def test_each_program_holds_its_passes_and_no_conditional(make):
  params = jax.tree.map(jnp.asarray, ref.init_mlp(0))
  x, y = ref.batches(seed=6, steps=1)[0]

  def sgd_step(params, opt_state, x, y):
    updates, opt_state = optax.sgd(LR).update(jax.grad(mlp_loss)(params, x, y), opt_state)
    return optax.apply_updates(params, updates), opt_state

  sgd_dots, _ = _ops(_compiled(jax.jit(sgd_step), params, optax.sgd(LR).init(params), x, y))
  assert sgd_dots >= 2
  tx = optax.chain(make(), optax.sgd(LR))
  step = jax.jit(train_step(tx), static_argnames="sam_step")
  opt_state = tx.init(params)
  assert _ops(_compiled(step, params, opt_state, x, y, sam_step=True)) == (2 * sgd_dots, 0)
  assert _ops(_compiled(step, params, opt_state, x, y, sam_step=False)) == (sgd_dots, 0)


def test_skip_nonfinite_keeps_its_own_guard():
  params = jax.tree.map(jnp.asarray, ref.init_mlp(0))
  x, y = ref.batches(seed=6, steps=1)[0]
  tx = optax.chain(fsam_optax.fsam(every=2, skip_nonfinite=True), optax.sgd(LR))
  step = jax.jit(train_step(tx), static_argnames="sam_step")
  opt_state = tx.init(params)
  device_side = _ops(_compiled(step, params, opt_state, x, y))[1]
  for choice in (True, False):
    assert _ops(_compiled(step, params, opt_state, x, y, sam_step=choice))[1] == device_side - 1


# ---- Bad input ----


def test_a_traced_choice_says_how_to_make_it_static():
  params = {"w": jnp.ones(2)}
  tx = optax.chain(fsam_optax.fsam(every=2), optax.sgd(0.1))
  grad_fn = fsam_optax.sam_value_and_grad(lambda p: jnp.sum(p["w"] ** 2))
  with pytest.raises(ValueError, match=r"`sam_step` must be a Python bool.*a JAX array.*static_"):
    jax.jit(lambda p, s, c: grad_fn(p, s, sam_step=c))(params, tx.init(params), True)
  with pytest.raises(ValueError, match=r"`sam_step` must be a Python bool or None, got str"):
    grad_fn(params, tx.init(params), sam_step="yes")


@pytest.mark.parametrize(
  ("step", "match"),
  [
    (True, r"`step` must be a Python int.*got bool"),
    (jnp.int32(3), r"`step` must be a Python int.*wait for the device"),
    (2.0, r"`step` must be a Python int.*got float"),
    (-1, r"`step` must be in \[0, 2\*\*31 - 1\], got -1"),
    (2**31, r"`step` must be in \[0, 2\*\*31 - 1\]"),
  ],
)
def test_is_sam_step_refuses_a_step_that_is_not_a_count(step, match):
  opt_state = optax.chain(fsam_optax.fsam(every=2), optax.sgd(0.1)).init({"w": jnp.zeros(2)})
  with pytest.raises(ValueError, match=match):
    fsam_optax.is_sam_step(opt_state, step)


def test_is_sam_step_names_itself_when_the_state_holds_no_method():
  opt_state = optax.sgd(0.1).init({"w": jnp.zeros(2)})
  with pytest.raises(ValueError, match=r"^is_sam_step: opt_state .* holds no SAM-family state"):
    fsam_optax.is_sam_step(opt_state, 0)
