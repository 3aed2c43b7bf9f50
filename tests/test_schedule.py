"""Cheaper schedules: the (F-)SAM step every k-th step, or with probability p.

Specification: a scheduled step is the every-step F-SAM step; a skipped step
runs one forward-backward pass, hands the clean gradient to the base optimizer
and still feeds it to the moving average; the step count advances on every
step; the choice depends only on the seed and the count.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import fsam_optax
from tests import reference as ref
from tests.jax_mlp import max_rel_error, mlp_loss, run_library
from tests.train_step import documented_draw, sam_step, sam_steps_at, sam_steps_taken

STEPS = 12
LR, MOMENTUM = 0.05, 0.9
FSAM = dict(rho=0.2, sigma=1.0, lmbda=0.6)
N_DEV = 8


def reference_path(data: list, take: list[bool], **fsam_kwargs) -> list[dict]:
  """F-SAM steps where ``take`` says so, else one pass; the EMA sees every g."""
  opt = ref.FSAMReference(**fsam_kwargs)
  base = ref.SGDReference(LR, MOMENTUM, 0.0)
  theta, path = ref.init_mlp(0), []
  for (x, y), taken in zip(data, take, strict=True):
    _, g = ref.mlp_loss_and_grad(theta, x, y)
    d = opt.direction(g)  # advances the moving average on every step
    if taken:
      e = opt.perturbation(theta, d)
      g = ref.mlp_loss_and_grad({k: theta[k] + e[k] for k in theta}, x, y)[1]
    theta = base.step(theta, g)
    path.append(theta)
  return path


# The reference is told which steps were taken; the draw is the library's, as it reports it.
CASES = [
  (dict(every=2), [t % 2 == 0 for t in range(STEPS)]),
  (dict(every=3), [t % 3 == 0 for t in range(STEPS)]),
  (dict(probability=0.5, seed=7), sam_steps_taken(STEPS, probability=0.5, seed=7)),
]


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_every_k_takes_steps_0_k_2k(k):
  assert sam_steps_taken(4 * k, every=k) == [t % k == 0 for t in range(4 * k)]


@pytest.mark.parametrize(("p", "seed"), [(0.5, 7), (0.5, 21), (0.3, 3)])
def test_probability_takes_the_documented_draw(p, seed):
  assert sam_steps_taken(40, probability=p, seed=seed) == documented_draw(p, seed, 40)


@pytest.mark.parametrize("sigma", [1.0, 0.0], ids=["fsam", "sam"])
@pytest.mark.parametrize(("schedule", "take"), CASES, ids=["every2", "every3", "p0.5"])
def test_schedule_equals_numpy_reference_in_float64(schedule, take, sigma):
  assert any(take) and not all(take)  # the case exercises both branches
  kwargs = {**FSAM, "sigma": sigma}
  with jax.enable_x64(True):
    data = ref.batches(seed=1, steps=STEPS)
    tx = optax.chain(fsam_optax.fsam(**kwargs, **schedule), optax.sgd(LR, momentum=MOMENTUM))
    path, state = run_library(tx, data)
    assert path[-1]["w0"].dtype == jnp.float64
    assert max_rel_error(path, reference_path(data, take, **kwargs)) < 1e-10
    assert int(state[0].count) == STEPS


@pytest.mark.parametrize("schedule", [dict(every=1), dict(probability=1.0, seed=3)])
def test_every_one_and_probability_one_equal_every_step_exactly(schedule):
  data = ref.batches(seed=2, steps=6)
  make = lambda **kw: optax.chain(fsam_optax.fsam(**FSAM, **kw), optax.sgd(LR, momentum=MOMENTUM))
  path, state = run_library(make(**schedule), data)
  every_step, every_state = run_library(make(), data)
  for got, want in zip(path, every_step, strict=True):
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(every_state), strict=True):
    np.testing.assert_array_equal(a, b)


def test_step_count_and_schedules_advance_on_skipped_steps():
  rho = optax.linear_schedule(0.1, 0.3, transition_steps=10)
  tx = optax.chain(fsam_optax.fsam(rho, sigma=1.0, lmbda=0.6, every=4), optax.sgd(LR))
  data = ref.batches(seed=3, steps=7)
  _, state = run_library(tx, data)
  assert int(state[0].count) == 7
  np.testing.assert_allclose(float(state[0].rho), float(rho(7)), rtol=1e-6)


def test_probability_choice_is_deterministic_and_has_the_asked_rate():
  counts = jnp.arange(4000, dtype=jnp.int32)
  pick = sam_steps_at(counts, probability=0.3, seed=11)
  np.testing.assert_array_equal(pick, sam_steps_at(counts, probability=0.3, seed=11))
  rate = float(np.mean(pick))
  assert abs(rate - 0.3) < 4 * np.sqrt(0.3 * 0.7 / 4000)
  assert not np.array_equal(pick, sam_steps_at(counts, probability=0.3, seed=12))


def test_two_runs_with_the_same_seed_are_identical():
  data = ref.batches(seed=4, steps=8)
  make = lambda: optax.chain(fsam_optax.fsam(**FSAM, probability=0.4, seed=5), optax.sgd(LR))
  a, _ = run_library(make(), data)
  b, _ = run_library(make(), data)
  for x, y in zip(a, b, strict=True):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_a_skipped_step_evaluates_the_loss_once():
  calls = []

  def loss(params, x, y):
    jax.debug.callback(lambda: calls.append(1))
    return mlp_loss(params, x, y)

  tx = optax.chain(fsam_optax.fsam(**FSAM, every=3), optax.sgd(LR))
  params = jax.tree.map(jnp.asarray, ref.init_mlp(0))
  opt_state = tx.init(params)
  step = sam_step(tx, loss)

  per_step = []
  for x, y in ref.batches(seed=5, steps=6):
    before = len(calls)
    params, opt_state = step(params, opt_state, x, y)
    jax.effects_barrier()
    per_step.append(len(calls) - before)
  assert per_step == [2, 1, 1, 2, 1, 1]


def test_without_a_schedule_the_step_holds_no_conditional():
  params = jax.tree.map(jnp.asarray, ref.init_mlp(0))
  x, y = ref.batches(seed=6, steps=1)[0]

  def jaxpr(**schedule):
    opt_state = optax.chain(fsam_optax.fsam(**FSAM, **schedule)).init(params)
    grad_fn = fsam_optax.sam_value_and_grad(mlp_loss)
    return str(jax.make_jaxpr(grad_fn)(params, opt_state, x, y))

  assert "cond[" not in jaxpr()
  assert "cond[" in jaxpr(every=2)


@pytest.mark.parametrize(
  ("kwargs", "match"),
  [
    (dict(every=0), r"`every` must be an integer >= 1"),
    (dict(every=2.5), r"`every` must be an integer >= 1"),
    (dict(every=True), r"`every` must be an integer >= 1"),
    (dict(probability=0.0), r"`probability` must be in \(0, 1\]"),
    (dict(probability=1.5), r"`probability` must be in \(0, 1\]"),
    (dict(probability=jnp.float32(0.5)), r"`probability` must be a Python number.*static_args"),
    (dict(every=jnp.int32(2)), r"`every` must be a Python number.*static_args"),
    (dict(every=2, seed=1), r"`seed` seeds the `probability` draws"),
    (dict(every=2, probability=0.5), r"give `every` or `probability`, not both"),
    (dict(probability=0.5, seed=-1), r"`seed` must be an integer in \[0, 2\*\*32\)"),
  ],
)
@pytest.mark.parametrize("factory", [fsam_optax.fsam, fsam_optax.sam])
def test_bad_schedule_arguments_are_refused(factory, kwargs, match):
  with pytest.raises(ValueError, match=match):
    factory(0.1, **kwargs)


def test_schedule_is_static_config_and_the_state_holds_no_key():
  params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
  state = fsam_optax.fsam(probability=0.5, seed=9).init(params)
  config = state.config
  assert (config.every, config.probability, config.seed) == (1, 0.5, 9)
  hash(config)  # a static, hashable pytree node: jit caches on it
  for leaf in jax.tree.leaves(state):
    assert not jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)
  assert len(jax.tree.leaves(state)) == len(jax.tree.leaves(fsam_optax.fsam().init(params)))


def test_under_inject_hyperparams_the_schedule_is_a_static_arg():
  params = {"w": jnp.ones(3)}
  with pytest.raises(ValueError, match=r"static_args=\('every', 'probability', 'seed'\)"):
    optax.inject_hyperparams(fsam_optax.fsam)(rho=0.1, every=2).init(params)
  inject = optax.inject_hyperparams(fsam_optax.fsam, static_args=("every", "probability", "seed"))
  data = ref.batches(seed=10, steps=4)
  tx = optax.chain(inject(rho=0.2, sigma=1.0, lmbda=0.6, every=2), optax.sgd(LR))
  path, state = run_library(tx, data)
  want, _ = run_library(optax.chain(fsam_optax.fsam(**FSAM, every=2), optax.sgd(LR)), data)
  for a, b in zip(path, want, strict=True):
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=1e-6)
  assert state[0].inner_state.config.every == 2


@pytest.mark.parametrize("adaptive", [False, True])
def test_shard_map_with_aux_and_diagnostics_equals_one_device(adaptive):
  # The skipped branch's outputs must type-check against the SAM branch's
  # under shard_map (replicated or varying norms), with aux passed through.
  kwargs = {**FSAM, "adaptive": adaptive, "every": 2}

  def loss_aux(params, x, y):
    return mlp_loss(params, x, y), jnp.sum(x, keepdims=True)  # a row per device

  mesh = jax.make_mesh((N_DEV,), ("batch",))
  norms = P("batch") if adaptive else P()
  shard_map = functools.partial(
    jax.shard_map,
    mesh=mesh,
    in_specs=(P(), P(), P("batch"), P("batch")),
    out_specs=(P(), P(), norms, (P(), P("batch"))),
  )
  perturbation_norms = lambda norms: np.asarray(norms).reshape(-1, 2)[:, 1]
  with jax.enable_x64(True):
    tx = optax.chain(fsam_optax.fsam(**kwargs), optax.sgd(LR))
    step = functools.partial(sam_step, tx, loss_aux, outputs=("norms", "loss"), has_aux=True)
    sharded, single = step(mapped=shard_map, axis_name="batch"), step()
    params = jax.tree.map(jnp.asarray, ref.init_mlp(0))
    a_params, a_state = params, tx.init(params)
    b_params, b_state = params, tx.init(params)
    for t, (x, y) in enumerate(ref.batches(seed=12, steps=4, batch=2 * N_DEV)):
      xs, ys = jax.device_put((x, y), NamedSharding(mesh, P("batch")))
      a_params, a_state, a_norm, _ = sharded(a_params, a_state, xs, ys)
      b_params, b_state, b_norm, _ = single(b_params, b_state, x, y)
      assert (perturbation_norms(a_norm) > 0).all() == (t % 2 == 0)
      assert (perturbation_norms(b_norm) > 0).all() == (t % 2 == 0)
      for k in b_params:
        np.testing.assert_allclose(a_params[k], b_params[k], rtol=1e-12, atol=1e-14)


def test_a_python_number_leaf_with_a_bfloat16_loss_under_a_schedule():
  # theta + e makes the Python float a strongly typed float32, which promotes the
  # second pass's bfloat16 loss; both branches of the schedule still agree.
  params = {"w": jnp.ones(3, jnp.bfloat16), "t": 2.0}
  loss = lambda p, x: jnp.sum((p["w"] * x * p["t"]) ** 2)
  tx = optax.chain(fsam_optax.fsam(rho=0.1, every=2), optax.sgd(0.1))
  grad_fn = jax.jit(fsam_optax.sam_value_and_grad(loss, return_diagnostics=True))
  value, _, diag = grad_fn(params, tx.init(params), jnp.ones(3, jnp.bfloat16))
  assert value.dtype == diag.perturbed_value.dtype == jnp.bfloat16
  assert float(diag.perturbed_value) > float(value)  # step 0 takes the SAM step
