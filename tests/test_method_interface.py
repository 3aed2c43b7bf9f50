"""A method of one's own: a state type and ``fsam_optax.method_transformation``, nothing else.

Specification: the helper perturbs along what ``direction`` returns, divided by
its norm (or by the norm a ``Direction`` brings), hands on what ``combine``
returns and stores its buffer; the norms a method reads are those of the whole
tree on a model-parallel mesh; a state or rule of the wrong shape is refused
with the method and the piece named, when it is defined or at its first trace.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import fsam_optax

RHO = 0.3


class SignState(NamedTuple):
  """Perturbs along sign(g); hands on the mean of g' and the last step's g' (its buffer)."""

  count: jax.Array
  rho: jax.Array
  eps: jax.Array
  config: fsam_optax.PerturbationConfig
  last: optax.Updates

  def direction(self, grads, step):
    return [jnp.sign(g) for g in grads]

  def combine(self, perturbed, clean, step):
    last = jax.tree.leaves(self.last)
    return [fsam_optax.SAMGrad((gp + m) / 2, gp) for gp, m in zip(perturbed, last, strict=True)]


def sign_sam(rho=RHO, **options):
  return fsam_optax.method_transformation(
    SignState, "sign_sam", rho=rho, eps=1e-12, buffer="last", **options
  )


def loss(params: dict, x: jax.Array) -> jax.Array:
  return jnp.sum(jnp.sin(params["w"] * x)) + jnp.sum(params["b"] ** 3)


PARAMS = {"w": jnp.arange(1.0, 9.0), "b": jnp.array([0.5, -1.0])}
X = jnp.linspace(0.1, 0.8, 8)


def by_hand(params: dict, scale=lambda s: jnp.sqrt(sum(jnp.sum(v**2) for v in s))) -> dict:
  s = jax.tree.map(jnp.sign, jax.grad(loss)(params, X))
  n = scale(jax.tree.leaves(s))
  return jax.grad(loss)(jax.tree.map(lambda p, v: p + RHO * v / (n + 1e-12), params, s), X)


def test_a_method_of_ones_own_is_driven_by_the_helper_and_stores_its_buffer():
  with jax.enable_x64(True):
    params = jax.tree.map(lambda a: a.astype(jnp.float64), PARAMS)
    tx = optax.chain(sign_sam(), optax.sgd(0.1))
    state = tx.init(params)
    step = jax.jit(lambda p, s: tx.update(fsam_optax.sam_value_and_grad(loss)(p, s, X)[1], s, p))
    updates, state = step(params, state)
    first = by_hand(params)
    for k in first:  # the buffer starts at zero: the mean of g' and 0
      np.testing.assert_allclose(updates[k], -0.1 * first[k] / 2, rtol=1e-14)
      np.testing.assert_allclose(state[0].last[k], first[k], rtol=1e-14)
    assert int(state[0].count) == 1 and state[0].config.method == "sign_sam"


def test_a_direction_may_bring_its_own_norm():
  class HalfNorm(NamedTuple):
    count: jax.Array
    rho: jax.Array
    eps: jax.Array
    config: fsam_optax.PerturbationConfig

    def direction(self, grads, step):
      s = [jnp.sign(g) for g in grads]
      return fsam_optax.Direction(s, 2 * step.norm(s))

  with jax.enable_x64(True):
    params = jax.tree.map(lambda a: a.astype(jnp.float64), PARAMS)
    tx = fsam_optax.method_transformation(HalfNorm, "half", rho=RHO, eps=1e-12)
    _, grads = fsam_optax.sam_value_and_grad(loss)(params, tx.init(params), X)
    want = by_hand(params, scale=lambda s: 2 * jnp.sqrt(sum(jnp.sum(v**2) for v in s)))
    for k, w in want.items():
      np.testing.assert_allclose(fsam_optax.base_grads(grads)[k], w, rtol=1e-14)


def test_the_norms_a_method_reads_are_of_the_whole_tree_on_a_model_parallel_mesh():
  mesh = jax.make_mesh((2,), ("model",))
  specs = {"w": P("model"), "b": P()}
  # Each device holds half of w and of x: the loss adds the halves' terms.
  split_loss = lambda p, x: (
    jax.lax.psum(jnp.sum(jnp.sin(p["w"] * x)), "model") + jnp.sum(p["b"] ** 3)
  )
  tx = sign_sam()
  state = tx.init(PARAMS)
  grad_fn = fsam_optax.sam_value_and_grad(split_loss, param_specs=specs)
  state_specs = state._replace(count=P(), rho=P(), eps=P(), last=specs)
  step = jax.shard_map(
    lambda p, s, x: jax.tree.map(
      lambda g: g.grad, grad_fn(p, s, x)[1], is_leaf=lambda g: isinstance(g, fsam_optax.SAMGrad)
    ),
    mesh=mesh,
    in_specs=(specs, state_specs, P("model")),
    out_specs=specs,
  )
  put = lambda tree, spec: jax.device_put(
    tree, jax.tree.map(lambda s: jax.NamedSharding(mesh, s), spec)
  )
  got = jax.jit(step)(put(PARAMS, specs), put(state, state_specs), put(X, P("model")))
  for k, want in by_hand(PARAMS).items():
    np.testing.assert_allclose(got[k], want / 2, rtol=1e-6)


class Minimal(NamedTuple):
  count: jax.Array
  rho: jax.Array
  eps: jax.Array
  config: fsam_optax.PerturbationConfig

  def direction(self, grads, step):
    return grads


def test_a_state_type_without_a_piece_is_refused_where_the_method_is_built():
  class NoConfig(NamedTuple):
    count: jax.Array
    rho: jax.Array
    eps: jax.Array

    def direction(self, grads, step):
      return grads

  class NoDirection(NamedTuple):
    count: jax.Array
    rho: jax.Array
    eps: jax.Array
    config: fsam_optax.PerturbationConfig

  build = fsam_optax.method_transformation
  with pytest.raises(TypeError, match=r"mine: the state type NoConfig lacks .*\['config'\]"):
    build(NoConfig, "mine", rho=0.1, eps=1e-12)
  with pytest.raises(TypeError, match=r"mine: the state type Minimal lacks .*\['theta'\]"):
    build(Minimal, "mine", rho=0.1, eps=1e-12, scalars={"theta": 0.5})
  with pytest.raises(TypeError, match=r"mine: .* NoDirection has no `direction"):
    build(NoDirection, "mine", rho=0.1, eps=1e-12)
  with pytest.raises(TypeError, match=r"mine: the state type dict must be a NamedTuple"):
    build(dict, "mine", rho=0.1, eps=1e-12)
  with pytest.raises(ValueError, match=r"mine: `rho` must be a radius >= 0"):
    build(Minimal, "mine", rho=-1.0, eps=1e-12)


def _refused(state_type, match, **options):
  tx = fsam_optax.method_transformation(state_type, "mine", rho=0.1, eps=1e-12, **options)
  with pytest.raises(ValueError, match=match):
    jax.jit(fsam_optax.sam_value_and_grad(loss))(PARAMS, tx.init(PARAMS), X)


def test_rules_of_the_wrong_shape_are_refused_at_the_first_trace():
  class ShortDirection(Minimal):
    def direction(self, grads, step):
      return grads[:1]

  class ScalarDirection(Minimal):
    def direction(self, grads, step):
      return [jnp.sum(g) for g in grads]

  class PlainCombine(Minimal):
    def combine(self, perturbed, clean, step):
      return perturbed

  class WideCombine(Minimal):
    def combine(self, perturbed, clean, step):
      return [fsam_optax.SAMGrad(g.astype(jnp.int32)) for g in perturbed]

  class OwnNorm(Minimal):
    def direction(self, grads, step):
      return fsam_optax.Direction(grads, step.norm(grads))

  _refused(
    ShortDirection,
    r"mine: `direction` must return a list of arrays, one for each of "
    r"the 2 gradient leaves .* got list of length 1",
  )
  _refused(
    ScalarDirection,
    r"mine: `direction` at leaf 0 is float32\[\], where the gradient "
    r"is float32\[2\]",
  )
  _refused(
    PlainCombine,
    r"mine: `combine` must return fsam_optax.SAMGrad leaves, got ArrayImpl|"
    r"mine: `combine` must return fsam_optax.SAMGrad leaves, got \w+ at leaf 0",
  )
  _refused(
    WideCombine,
    r"mine: `combine`'s gradient at leaf 0 is int32\[2\], where the "
    r"parameter's gradient is float32\[2\]",
  )
  _refused(
    OwnNorm, r"mine: its direction comes with a norm of its own.*without `adaptive`", adaptive=True
  )


def test_a_norm_or_a_buffer_unlike_the_state_s_is_refused_at_the_first_trace():
  class VectorNorm(Minimal):
    def direction(self, grads, step):
      return fsam_optax.Direction(grads, jnp.ones(2))

  class IntBuffer(SignState):
    def combine(self, perturbed, clean, step):
      return [fsam_optax.SAMGrad(gp, gp.astype(jnp.int32)) for gp in perturbed]

  class StrayBuffer(Minimal):
    def combine(self, perturbed, clean, step):
      return [fsam_optax.SAMGrad(gp, gp) for gp in perturbed]

  class NoBuffer(SignState):
    def combine(self, perturbed, clean, step):
      return [fsam_optax.SAMGrad(gp) for gp in perturbed]

  _refused(
    VectorNorm,
    r"mine: the norm of its `Direction` must be a floating-point scalar, "
    r"got float32\[2\]",
  )
  _refused(
    IntBuffer,
    r"mine: `combine`'s buffer at leaf 0 is int32\[2\], where the state's is "
    r"float32\[2\]; cast it with .astype\(float32\)",
    buffer="last",
  )
  _refused(StrayBuffer, r"mine: `combine` returns a buffer at leaf 0, but the method keeps none")
  _refused(NoBuffer, r"mine: `combine` returns no buffer at leaf 0", buffer="last")


def test_a_hyperparameter_the_state_lacks_is_named_with_those_it_has():
  class Typo(Minimal):
    def direction(self, grads, step):
      return [g * step.hyperparam("rh0") for g in grads]

  _refused(
    Typo,
    r"mine: `step.hyperparam\('rh0'\)` names no scalar of the state; it has "
    r"\['rho', 'eps'\]",
  )


def test_the_builder_refuses_arguments_no_method_may_take():
  build = fsam_optax.method_transformation
  with pytest.raises(ValueError, match=r"`name` must be an identifier string, got 3"):
    build(Minimal, 3, rho=0.1, eps=1e-12)
  with pytest.raises(ValueError, match=r"mine: the scalars and the buffer need fields .*\['rho'\]"):
    build(Minimal, "mine", rho=0.1, eps=1e-12, scalars={"rho": 0.2})
  with pytest.raises(ValueError, match=r"mine: `adaptive` must be a Python bool, got 'False'"):
    build(Minimal, "mine", rho=0.1, eps=1e-12, adaptive="False")
  with pytest.raises(
    ValueError, match=r"mine: the buffer's dtype must be floating point, got int32"
  ):
    build(SignState, "mine", rho=0.1, eps=1e-12, buffer="last", buffer_dtype=jnp.int32)
  with pytest.raises(TypeError, match=r"mine: .* keeps a buffer \(`count2`\) but has no `combine"):
    build(Minimal, "mine", rho=0.1, eps=1e-12, buffer="count2")

  class WithTheta(NamedTuple):
    count: jax.Array
    rho: jax.Array
    theta: jax.Array
    eps: jax.Array
    config: fsam_optax.PerturbationConfig

    def direction(self, grads, step):
      return grads

  with pytest.raises(ValueError, match=r"mine: `theta` must be finite, got nan"):
    build(WithTheta, "mine", rho=0.1, eps=1e-12, scalars={"theta": float("nan")})
  with pytest.raises(ValueError, match=r"mine: the static option `s` must be hashable"):
    build(WithTheta, "mine", rho=0.1, eps=1e-12, scalars={"theta": 1.0}, options={"s": []})


def test_a_scalar_schedule_and_a_static_option_reach_the_rules():
  """A scalar given as a schedule is read at the count of each step; an option as given."""

  class Scaled(NamedTuple):
    count: jax.Array
    rho: jax.Array
    k: jax.Array
    eps: jax.Array
    config: fsam_optax.PerturbationConfig

    def direction(self, grads, step):
      sign = -1.0 if self.config.option("flip") else 1.0
      return [sign * step.hyperparam("k") * g for g in grads]

  schedule = lambda count: 1.0 + count
  tx = optax.chain(
    fsam_optax.method_transformation(
      Scaled, "scaled", rho=RHO, eps=1e-12, scalars={"k": schedule}, options={"flip": True}
    ),
    optax.sgd(0.1),
  )
  grad_fn = fsam_optax.sam_value_and_grad(loss)
  opt_state = tx.init(PARAMS)
  for t in range(3):
    assert float(opt_state[0].k) == schedule(t)
    _, grads = grad_fn(PARAMS, opt_state, X)
    # -k g over its norm: the perturbation of -g (k > 0), flipped by the option.
    g = jax.grad(loss)(PARAMS, X)
    n = optax.tree.norm(g)
    e = jax.tree.map(lambda v, n=n: -RHO * v / n, g)
    want = jax.grad(loss)(jax.tree.map(jnp.add, PARAMS, e), X)
    got = fsam_optax.base_grads(grads)
    for key in PARAMS:
      np.testing.assert_allclose(got[key], want[key], rtol=1e-5)
    _, opt_state = tx.update(grads, opt_state, PARAMS)
  assert opt_state[0].config.option("flip") is True


class Decoupled(NamedTuple):
  """SAM's perturbation; the base optimizer gets g, and -0.5 (g' - g) is added after it."""

  count: jax.Array
  rho: jax.Array
  eps: jax.Array
  config: fsam_optax.PerturbationConfig

  def direction(self, grads, step):
    return grads

  def combine(self, perturbed, clean, step):
    return [
      fsam_optax.SAMGrad(g, None, -0.5 * (gp - g)) for gp, g in zip(perturbed, clean, strict=True)
    ]


def decoupled(**options):
  return fsam_optax.method_transformation(Decoupled, "decoupled", rho=RHO, eps=1e-12, **options)


def test_a_term_after_the_base_optimizer_bypasses_its_momentum():
  with jax.enable_x64(True):
    params = jax.tree.map(lambda a: a.astype(jnp.float64), PARAMS)
    tx = fsam_optax.chain(decoupled(), optax.sgd(0.1, momentum=0.9))
    grad_fn = jax.jit(fsam_optax.sam_value_and_grad(loss))
    p, state, trace, want = params, tx.init(params), None, params
    for _ in range(3):
      _, grads = grad_fn(p, state, X)
      updates, state = tx.update(grads, state, p)
      p = optax.apply_updates(p, updates)
      # By hand: momentum SGD on g, then the term, which the trace never sees.
      g = jax.grad(loss)(want, X)
      norm = jnp.sqrt(sum(jnp.sum(v**2) for v in jax.tree.leaves(g)))
      moved = jax.tree.map(lambda w, v, n=norm: w + RHO * v / n, want, g)
      g_prime = jax.grad(loss)(moved, X)
      trace = g if trace is None else jax.tree.map(lambda t, v: 0.9 * t + v, trace, g)
      want = jax.tree.map(lambda w, t, gp, v: w - 0.1 * t - 0.5 * (gp - v), want, trace, g_prime, g)
      for k in want:
        np.testing.assert_allclose(p[k], want[k], rtol=1e-12)


def test_a_term_after_the_base_optimizer_needs_fsam_optax_chain():
  tx = optax.chain(decoupled(), optax.sgd(0.1))
  _, grads = fsam_optax.sam_value_and_grad(loss)(PARAMS, tx.init(PARAMS), X)
  with pytest.raises(ValueError, match=r"decoupled adds a term .* fsam_optax.chain\(decoupled"):
    tx.update(grads, tx.init(PARAMS), PARAMS)


def test_no_term_is_added_on_a_step_the_method_leaves_out():
  tx = fsam_optax.chain(decoupled(skip_nonfinite=True), optax.apply_if_finite(optax.sgd(0.1), 3))
  state = tx.init(PARAMS)
  nan_loss = lambda p, x: loss(p, x) * jnp.nan
  _, grads = fsam_optax.sam_value_and_grad(nan_loss)(PARAMS, state, X)
  updates, new_state = tx.update(grads, state, PARAMS)
  assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
  assert int(new_state[0].count) == 0


class TwoPassTerm(Decoupled):
  """Decoupled's term on two-pass steps only: a one-pass step hands on g and no term."""

  def combine(self, perturbed, clean, step):
    if not step.two_pass:
      return [fsam_optax.SAMGrad(g) for g in clean]
    return super().combine(perturbed, clean, step)


def test_a_term_on_two_pass_steps_only_works_with_the_device_s_choice():
  """The device's lax.cond needs both branches alike: the one-pass branch adds zero terms."""
  with jax.enable_x64(True):
    params = jax.tree.map(lambda a: a.astype(jnp.float64), PARAMS)
    build = lambda: fsam_optax.method_transformation(
      TwoPassTerm, "two_pass_term", rho=RHO, eps=1e-12, every=2
    )
    tx = fsam_optax.chain(build(), optax.sgd(0.1))
    grad_fn = fsam_optax.sam_value_and_grad(loss)

    @functools.partial(jax.jit, static_argnames="sam_step")
    def step(p, state, sam_step=None):
      _, grads = grad_fn(p, state, X, sam_step=sam_step)
      updates, state = tx.update(grads, state, p)
      return optax.apply_updates(p, updates), state

    device, host = (params, tx.init(params)), (params, tx.init(params))
    for i in range(6):
      device = step(*device)
      host = step(*host, sam_step=fsam_optax.is_sam_step(host[1], i))
      for k in params:
        np.testing.assert_allclose(device[0][k], host[0][k], rtol=1e-12)
