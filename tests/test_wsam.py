"""WSAM follows its float64 NumPy statement (the official class, ``reference.WSAMReference``).

32 steps of the MLP, on SGD with momentum and weight decay, and on Adam, with a
learning rate that changes at every step: the decoupled term must use the
learning rate of the update it belongs to and pass by the base's momentum,
weight decay and preconditioning.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fsam_optax
from tests import reference as ref
from tests import test_family_layouts as layouts
from tests.jax_mlp import max_rel_error, mlp_loss, run_library
from tests.train_step import replicate

STEPS, TOL = 32, 1e-12
MOMENTUM, WD = 0.9, 1e-3


def lr_at(t):
  """A learning rate that changes at every step (float64 on both sides)."""
  return 0.05 * (1 + 0.5 * np.sin(t))


def lr_schedule(count):
  return 0.05 * (1 + 0.5 * jnp.sin(jnp.asarray(count, jnp.float64)))


def wsam(kw):
  lr = {"learning_rate": lr_schedule} if kw.get("decoupled", True) else {}
  return fsam_optax.wsam(**kw, **lr)


def compare(kw, base="sgd", take=None, mask=None, seed=1):
  """The library's and the reference's worst relative error over STEPS steps."""
  with jax.enable_x64(True):
    data = ref.batches(seed=seed, steps=STEPS)
    if base == "sgd":
      optimizer = [optax.add_decayed_weights(WD), optax.sgd(lr_schedule, momentum=MOMENTUM)]
      base_ref = ref.SGDReference(0.0, MOMENTUM, WD)
    else:
      optimizer, base_ref = [optax.adam(lr_schedule)], ref.AdamReference(0.0)
    options = {} if mask is None else {"mask": {k: k in mask for k in ref.init_mlp(0)}}
    tx = fsam_optax.chain(wsam({**kw, **options}), *optimizer)
    if take is None:
      path, _ = run_library(tx, data)
    else:
      path = one_and_two_pass_run(tx, data, take)
    method = ref.WSAMReference(**kw, kept=mask)
    want = ref.train_family(method, base_ref, ref.init_mlp(0), data, take=take, lr_at=lr_at)
    return max_rel_error(path, want)


def one_and_two_pass_run(tx, data, take):
  """The library with the host's choice of pass at each step."""
  grad_fn = fsam_optax.sam_value_and_grad(mlp_loss)

  @jax.jit(static_argnames="sam_step")
  def step(params, opt_state, x, y, sam_step):
    _, grads = grad_fn(params, opt_state, x, y, sam_step=sam_step)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params = jax.tree.map(jnp.asarray, ref.init_mlp(0))
  opt_state, path = tx.init(params), []
  for (x, y), chosen in zip(data, take, strict=True):
    params, opt_state = step(params, opt_state, x, y, chosen)
    path.append(params)
  return path


CASES = [
  dict(rho=0.2, gamma=0.9),
  dict(rho=0.1, gamma=0.6),
  dict(rho=0.2, gamma=0.8, decoupled=False),
  dict(rho=0.2, gamma=0.9, max_norm=0.05),
  dict(rho=0.2, gamma=0.8, decoupled=False, max_norm=0.05),
  dict(rho=0.3, gamma=0.9, adaptive=True),
]


@pytest.mark.parametrize("kw", CASES, ids=str)
def test_wsam_equals_reference(kw):
  assert compare(kw) < TOL


@pytest.mark.parametrize("decoupled", [True, False])
def test_wsam_on_adam_equals_reference(decoupled):
  """Decoupled, the sharpness term is added past Adam's preconditioning."""
  assert compare(dict(rho=0.2, gamma=0.9, decoupled=decoupled), base="adam") < TOL


def test_wsam_with_a_mask_perturbs_the_kept_leaves_and_combines_all():
  assert compare(dict(rho=0.2, gamma=0.9), mask=["w0", "w1"]) < TOL


def test_one_pass_steps_hand_on_g_and_add_nothing():
  take = [t % 3 == 0 for t in range(STEPS)]
  assert compare(dict(rho=0.2, gamma=0.9, max_norm=0.05), take=take) < TOL


def test_the_comparison_tells_the_forms_apart():
  """Each variant the tests pass is far (> 1e-3) from the others' references."""
  with jax.enable_x64(True):
    data = ref.batches(seed=1, steps=STEPS)
    path, _ = run_library(
      fsam_optax.chain(
        wsam(dict(rho=0.2, gamma=0.9, max_norm=0.05)),
        optax.add_decayed_weights(WD),
        optax.sgd(lr_schedule, momentum=MOMENTUM),
      ),
      data,
    )
    variants = {
      "no clipping": (dict(decoupled=True), lr_at),
      "coupled": (dict(decoupled=False, max_norm=0.05), lr_at),
      "the first step's learning rate throughout": (dict(max_norm=0.05), lambda t: lr_at(0)),
    }
    for name, (kw, lr) in variants.items():
      method = ref.WSAMReference(0.2, 0.9, **kw)
      base = ref.SGDReference(0.0, MOMENTUM, WD)
      want = ref.train_family(method, base, ref.init_mlp(0), data, lr_at=lr)
      assert max_rel_error(path, want) > 1e-3, name


def test_coupled_gamma_one_half_is_sam():
  with jax.enable_x64(True):
    data = ref.batches(seed=2, steps=8)
    base = [optax.sgd(0.05, momentum=MOMENTUM)]
    wsam_path, _ = run_library(
      fsam_optax.chain(fsam_optax.wsam(0.2, 0.5, decoupled=False), *base), data
    )
    sam_path, _ = run_library(fsam_optax.chain(fsam_optax.sam(0.2), *base), data)
    assert max_rel_error(wsam_path, sam_path) < 1e-15


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(gamma=1.0, learning_rate=0.1), r"wsam: `gamma` must be in \[0, 1\)"),
    (dict(gamma=-0.1, learning_rate=0.1), r"wsam: `gamma` must be in \[0, 1\)"),
    (dict(gamma=float("nan"), learning_rate=0.1), r"wsam: `gamma` must be in \[0, 1\)"),
    (dict(), r"wsam: the decoupled form .* pass its `learning_rate`.* or decoupled=False"),
    (
      dict(decoupled=False, learning_rate=0.1),
      r"`learning_rate` is read by the decoupled form only",
    ),
    (dict(learning_rate=-0.1), r"wsam: `learning_rate` must be >= 0"),
    (dict(learning_rate=0.1, max_norm=0.0), r"wsam: `max_norm` must be > 0 \(None: no clipping\)"),
    (dict(learning_rate=0.1, max_norm=-1.0), r"wsam: `max_norm` must be > 0"),
    (dict(learning_rate=0.1, max_norm=jnp.float32(1.0)), r"static_args=\(\"max_norm\",\)"),
    (dict(learning_rate=0.1, decoupled=1), r"wsam: `decoupled` must be a Python bool"),
  ],
)
def test_bad_arguments_are_refused(kwargs, match):
  with pytest.raises(ValueError, match=match):
    fsam_optax.wsam(0.1, **kwargs)


def test_decoupled_wsam_under_optax_chain_is_refused_with_the_fix():
  params = {"w": jnp.ones(3)}
  tx = optax.chain(fsam_optax.wsam(0.1, learning_rate=0.1), optax.sgd(0.1))
  grad_fn = fsam_optax.sam_value_and_grad(lambda p: jnp.sum(p["w"] ** 2))
  opt_state = tx.init(params)
  _, grads = grad_fn(params, opt_state)
  with pytest.raises(
    ValueError, match=r"build the optimizer with fsam_optax.chain\(wsam\(...\), base\)"
  ):
    tx.update(grads, opt_state, params)


def mean_over(trees):
  """The mean of a list of dicts of arrays, leaf by leaf (the workers' all-reduce)."""
  return {k: np.mean([t[k] for t in trees], axis=0) for k in trees[0]}


def test_per_device_clipping_acts_on_the_averaged_gradients_as_the_class_under_ddp():
  """Each worker perturbs with its own g; g and g' are averaged, then clipped and combined."""
  n, steps, max_norm = jax.device_count(), 6, 0.05
  tx = fsam_optax.chain(
    fsam_optax.wsam(0.2, 0.9, learning_rate=0.05, max_norm=max_norm),
    optax.sgd(0.05, momentum=MOMENTUM),
  )
  grad_fn = fsam_optax.sam_value_and_grad(mlp_loss, axis_name="data", perturbation="per_device")

  def step(params, opt_state, x, y):
    _, grads = grad_fn(params, opt_state, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  step = jax.pmap(step, axis_name="data")
  with jax.enable_x64(True):
    data = ref.batches(seed=4, steps=steps, batch=2 * n)
    params = jax.tree.map(jnp.asarray, ref.init_mlp(0))
    params, opt_state = replicate(params, n), replicate(tx.init(params), n)
    theta, base = ref.init_mlp(0), ref.SGDReference(0.05, MOMENTUM, 0.0)
    method = ref.WSAMReference(0.2, 0.9, max_norm=max_norm, lr=0.05)
    clipped = False
    for x, y in data:
      params, opt_state = step(params, opt_state, x.reshape(n, 2, -1), y.reshape(n, 2, -1))
      shards = [(x[2 * i : 2 * i + 2], y[2 * i : 2 * i + 2]) for i in range(n)]
      g = [ref.mlp_loss_and_grad(theta, *b)[1] for b in shards]
      e = [ref.sam_perturbation(theta, gi, 0.2, ref.EPS) for gi in g]
      gp = [
        ref.mlp_loss_and_grad(ref.shift(theta, ei), *b)[1] for ei, b in zip(e, shards, strict=True)
      ]
      g_avg, gp_avg = mean_over(g), mean_over(gp)
      clipped |= ref.norm(g_avg) > max_norm
      g_avg, gp_avg = method.clip(g_avg), method.clip(gp_avg)
      term = {k: -0.05 * 9.0 * (gp_avg[k] - g_avg[k]) for k in theta}
      theta = base.step(theta, g_avg)
      theta = {k: theta[k] + term[k] for k in theta}
      got = jax.tree.map(lambda a: np.asarray(a[0]), params)
      assert max_rel_error([got], [theta]) < 1e-12
    assert clipped


def test_a_non_finite_perturbed_gradient_leaves_the_whole_step_out():
  """g finite, g' not (the perturbation crosses sqrt's domain): the term must not slip in."""
  params = {"w": jnp.array([0.01, 1.0])}
  tx = fsam_optax.chain(
    fsam_optax.wsam(0.5, 0.9, learning_rate=0.1, skip_nonfinite=True),
    optax.apply_if_finite(optax.sgd(0.1), 3),
  )
  grad_fn = fsam_optax.sam_value_and_grad(lambda p: -jnp.sum(jnp.sqrt(p["w"])))
  opt_state = tx.init(params)
  _, grads = grad_fn(params, opt_state)
  assert np.all(np.isfinite(jax.grad(lambda p: -jnp.sum(jnp.sqrt(p["w"])))(params)["w"]))
  updates, new_state = tx.update(grads, opt_state, params)
  np.testing.assert_array_equal(updates["w"], np.zeros(2))
  assert int(new_state[0].count) == 0
  assert int(new_state[1].notfinite_count) == 1


def test_an_injected_learning_rate_scales_the_term_of_its_own_update():
  """Injected around wsam or around the whole optimizer, as passed directly: the term uses
  the learning rate of the update it is added at, which the injection sets then."""
  inject = optax.inject_hyperparams
  sgd = lambda lr: optax.sgd(lr, momentum=MOMENTUM)
  ways = {
    "around wsam": fsam_optax.chain(
      inject(fsam_optax.wsam)(rho=0.2, gamma=0.9, learning_rate=lr_schedule), sgd(lr_schedule)
    ),
    "around the optimizer": inject(
      lambda learning_rate: fsam_optax.chain(
        fsam_optax.wsam(0.2, 0.9, learning_rate=learning_rate), sgd(learning_rate)
      )
    )(learning_rate=lr_schedule),
  }
  with jax.enable_x64(True):
    data = ref.batches(seed=1, steps=12)
    want, _ = run_library(
      fsam_optax.chain(fsam_optax.wsam(0.2, 0.9, learning_rate=lr_schedule), sgd(lr_schedule)),
      data,
    )
    for name, tx in ways.items():
      got, _ = run_library(tx, data)
      assert max_rel_error(got, want) < TOL, name


@pytest.mark.parametrize(
  "base",
  [
    [optax.MultiSteps(optax.sgd(0.1), every_k_schedule=2).gradient_transformation()],
    [optax.sgd(0.1), optax.apply_every(2)],
  ],
  ids=["MultiSteps", "apply_every"],
)
def test_a_transformation_that_holds_updates_back_after_a_decoupled_wsam_is_refused(base):
  tx = fsam_optax.chain(fsam_optax.wsam(0.1, learning_rate=0.1), *base)
  params = {"w": jnp.ones(3)}
  grad_fn = fsam_optax.sam_value_and_grad(lambda p: jnp.sum(p["w"] ** 2))
  opt_state = tx.init(params)
  _, grads = grad_fn(params, opt_state)
  with pytest.raises(ValueError, match=r"optax.MultiSteps or optax.apply_every .* micro_batches=k"):
    tx.update(grads, opt_state, params)


def test_base_grads_of_decoupled_wsam_are_g():
  params = {"w": jnp.array([3.0, 4.0])}
  loss = lambda p: jnp.sum(p["w"] ** 3)
  tx = fsam_optax.chain(fsam_optax.wsam(0.1, learning_rate=0.1), optax.sgd(0.1))
  _, grads = fsam_optax.sam_value_and_grad(loss)(params, tx.init(params))
  np.testing.assert_array_equal(fsam_optax.base_grads(grads)["w"], jax.grad(loss)(params)["w"])


def test_a_leaf_masked_here_and_frozen_in_the_base_does_not_move():
  """The term bypasses the base optimizer: the mask keeps it off a frozen leaf."""
  params = {"frozen": jnp.array([1.0, -2.0]), "w": jnp.array([0.5, 1.5])}
  labels = {"frozen": "frozen", "w": "train"}
  base = optax.multi_transform({"frozen": optax.set_to_zero(), "train": optax.sgd(0.1)}, labels)
  mask = {"frozen": False, "w": True}
  tx = fsam_optax.chain(fsam_optax.wsam(0.5, 0.9, learning_rate=0.1, mask=mask), base)
  grad_fn = fsam_optax.sam_value_and_grad(lambda p: jnp.sum(p["frozen"] ** 2 * p["w"] ** 4))
  opt_state = tx.init(params)
  _, grads = grad_fn(params, opt_state)
  updates, _ = tx.update(grads, opt_state, params)
  np.testing.assert_array_equal(updates["frozen"], np.zeros(2))
  assert np.all(updates["w"] != 0)


def test_inject_hyperparams_with_max_norm_static():
  """max_norm named in static_args; gamma and learning_rate injected."""
  with jax.enable_x64(True):
    data = ref.batches(seed=1, steps=6)
    base = [optax.sgd(0.05)]
    injected = optax.inject_hyperparams(fsam_optax.wsam, static_args=("max_norm",))
    a, _ = run_library(
      fsam_optax.chain(injected(rho=0.2, gamma=0.8, learning_rate=0.05, max_norm=0.05), *base), data
    )
    b, _ = run_library(
      fsam_optax.chain(fsam_optax.wsam(0.2, 0.8, learning_rate=0.05, max_norm=0.05), *base), data
    )
    assert max_rel_error(a, b) < TOL


@pytest.mark.parametrize("shape, names", [((4,), ("model",)), ((2, 4), ("data", "model"))])
def test_clipping_on_a_model_mesh_equals_one_device(shape, names):
  """The clip's norm adds over the shards of the leaves split over "model"."""
  with jax.enable_x64(True):
    x, y = layouts.data()[0]
    norm = optax.tree.norm(jax.grad(mlp_loss)(layouts.init(), x, y))
    assert norm > 2 * layouts.HP["wsam_clipped"]["max_norm"]  # the clip acts
    got = layouts.run_shard_map("wsam_clipped", shape, names)
    layouts.assert_same_run(got, layouts.single_device("wsam_clipped"))
