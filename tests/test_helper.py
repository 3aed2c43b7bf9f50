"""``sam_value_and_grad``: its (perturbed, clean) pairs and their helpers, the
diagnostics, the second pass's key, micro-batches, and a 1,000-leaf tree.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fsam_optax
from tests.jax_mlp import quadratic_loss
from tests.reference import fsam_steps
from tests.test_transformation import TARGET, fsam_chain, init_params, parabola
from tests.train_step import sam_step

HYPER = {"rho": 0.2, "sigma": 1.0, "lmbda": 0.6}
LR = 0.1


def one_step(tx=None):
  rng = np.random.default_rng(0)
  params = {"b": jnp.asarray(rng.normal(size=3)), "w": jnp.asarray(rng.normal(size=(3, 2)))}
  a = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape)), params)
  c = jax.tree.map(lambda x: jnp.asarray(0.5 + rng.random(size=x.shape)), params)
  tx = tx or optax.chain(fsam_optax.fsam(**HYPER), optax.sgd(LR))
  grad_fn = fsam_optax.sam_value_and_grad(quadratic_loss, return_diagnostics=True)
  _, grads, diag = grad_fn(params, tx.init(params), a, c)
  return params, a, c, grads, diag


def test_plain_trees_and_their_norms_match_the_float64_reference():
  with jax.enable_x64(True):
    params, a, c, grads, diag = one_step()
  leaves = lambda t: [np.asarray(x) for x in jax.tree.leaves(t)]
  (want,) = fsam_steps(leaves(params), [leaves(a)], leaves(c), **HYPER, lr=LR)
  perturbed = fsam_optax.base_grads(grads)
  assert jax.tree.structure(perturbed) == jax.tree.structure(params)
  for x, y in zip(leaves(perturbed), want.perturbed, strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-13)
  # The moving average each pair hands the state: m = g on the first step.
  buffers = jax.tree.map(
    lambda p: p.buffer, grads, is_leaf=lambda x: isinstance(x, fsam_optax.SAMGrad)
  )
  for x, y in zip(leaves(buffers), want.clean, strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-13)
  norm = lambda xs: np.sqrt(sum(np.sum(x**2) for x in xs))
  np.testing.assert_allclose(float(diag.perturbed_grad_norm), norm(want.perturbed), rtol=1e-13)
  np.testing.assert_allclose(float(diag.clean_grad_norm), norm(want.clean), rtol=1e-13)


def test_optax_global_norm_of_the_pairs_mixes_both_gradients():
  """Why base_grads exists: optax.tree.norm cannot tell a SAMGrad from a subtree.

  On the first step F-SAM's average is g, so the norm of the tree mixes g' and g.
  """
  _, _, _, grads, diag = one_step()
  mixed = float(optax.tree.norm(grads))
  both = np.hypot(float(diag.perturbed_grad_norm), float(diag.clean_grad_norm))
  np.testing.assert_allclose(mixed, both, rtol=1e-5)
  np.testing.assert_allclose(
    float(optax.tree.norm(fsam_optax.base_grads(grads))),
    float(diag.perturbed_grad_norm),
    rtol=1e-6,
  )


def test_plain_sam_hands_no_buffer_but_the_diagnostics_have_the_clean_norm():
  _, _, _, grads, diag = one_step(optax.chain(fsam_optax.sam(0.2), optax.sgd(0.1)))
  is_grad = lambda x: isinstance(x, fsam_optax.SAMGrad)
  assert all(p.buffer is None for p in jax.tree.leaves(grads, is_leaf=is_grad))
  assert float(diag.clean_grad_norm) > 0
  assert jax.tree.structure(fsam_optax.base_grads(grads)) == jax.tree.structure({"b": 0, "w": 0})


def test_helpers_refuse_a_plain_tree():
  with pytest.raises(ValueError, match=r"base_grads: expected the gradients of sam_value"):
    fsam_optax.base_grads({"w": jnp.ones(2)})


@pytest.mark.parametrize(
  "use",
  [
    lambda params, grads: optax.apply_updates(params, grads),
    lambda params, grads: jax.tree.map(lambda p, g: p - 0.1 * g, params, grads),
    lambda params, grads: np.asarray(grads["w"]),
  ],
  ids=["apply_updates", "tree_map_arithmetic", "numpy"],
)
def test_a_pair_used_as_an_array_raises_with_what_to_do(use):
  params, _, _, grads, _ = one_step()
  with pytest.raises(TypeError, match=r"SAMGrad was used as an array.*base_grads\(grads\)"):
    use(params, grads)


def test_diagnostics_are_the_losses_and_norms_of_the_two_passes():
  tx = fsam_chain()  # rho 0.2
  params = init_params()
  grad_fn = fsam_optax.sam_value_and_grad(parabola, return_diagnostics=True)
  value, _, diag = grad_fn(params, tx.init(params))
  # First step: e = rho * g / ||g||, with the parabola's gradient written out by hand.
  g = {"w": 2 * (params["w"] - TARGET), "b": 2 * params["b"]}
  norm = jnp.sqrt(sum(jnp.sum(x**2) for x in g.values()))
  perturbed = {k: params[k] + 0.2 * g[k] / norm for k in params}
  clean_loss, perturbed_loss = float(parabola(params)), float(parabola(perturbed))
  assert float(value) == float(diag.value) == clean_loss
  np.testing.assert_allclose(float(diag.perturbed_value), perturbed_loss, rtol=1e-6)
  np.testing.assert_allclose(float(diag.sharpness), perturbed_loss - clean_loss, rtol=1e-5)
  np.testing.assert_allclose(float(diag.direction_norm), float(norm), rtol=1e-6)
  np.testing.assert_allclose(float(diag.perturbation_norm), 0.2, rtol=1e-6)


# ---- micro-batches (tests/test_layouts.py compares them with the whole batch) ----


def test_aux_gets_one_row_per_micro_batch():
  loss = lambda p, x: (jnp.mean((x @ p) ** 2), jnp.mean(x, axis=0))
  grad_fn = fsam_optax.sam_value_and_grad(loss, has_aux=True, micro_batches=4)
  params, x = jnp.ones(3), jnp.arange(24.0).reshape(8, 3)
  (_, aux), _ = jax.jit(grad_fn)(params, fsam_optax.fsam(**HYPER).init(params), x)
  np.testing.assert_array_equal(aux, x.reshape(4, 2, 3).mean(axis=1))


# ---- the key of the second pass: a fresh dropout mask (the default, as the official
# code draws one per forward pass) or the same one ----

RHO = 0.1


def dropout_loss(params, key, x, *, rate=0.5):
  h = jnp.tanh(x @ params["w"])
  keep = jax.random.bernoulli(key, 1 - rate, h.shape)
  return jnp.mean(jnp.where(keep, h / (1 - rate), 0.0) ** 2)


def kw_loss(params, x, *, key):
  return dropout_loss(params, key, x)


def dropout_problem():
  k1, k2 = jax.random.split(jax.random.key(0))
  params = {"w": jax.random.normal(k1, (4, 8))}
  return params, jax.random.key(7), jax.random.normal(k2, (16, 4))


def by_hand(params, key_clean, key_perturbed, x):
  """SAM's two gradients written out: g at theta, g' at theta + rho g / ||g||."""
  g = jax.grad(dropout_loss)(params, key_clean, x)
  e = jax.tree.map(lambda v: RHO * v / optax.tree.norm(g), g)
  return g, jax.grad(dropout_loss)(optax.apply_updates(params, e), key_perturbed, x)


FRESH = lambda key: jax.random.fold_in(key, 1)
SAME = lambda key: key


@pytest.mark.parametrize(
  ("options", "second_key", "other_key"),
  [
    (dict(rng_arg=1), FRESH, SAME),  # the default
    (dict(rng_arg=1, second_pass_rng="fresh"), FRESH, SAME),
    (dict(rng_arg=1, second_pass_rng="same"), SAME, FRESH),
    (dict(), SAME, FRESH),  # no rng_arg: both passes get the same arguments
  ],
  ids=["default", "fresh", "same", "no_rng_arg"],
)
def test_second_pass_key(options, second_key, other_key):
  params, key, x = dropout_problem()
  with jax.enable_x64(True):
    params = jax.tree.map(lambda v: v.astype(jnp.float64), params)
    x = x.astype(jnp.float64)
    grad_fn = fsam_optax.sam_value_and_grad(dropout_loss, **options)
    _, grads = grad_fn(params, fsam_optax.sam(RHO).init(params), key, x)
    _, g_pert = by_hand(params, key, second_key(key), x)
    _, g_other = by_hand(params, key, other_key(key), x)
  np.testing.assert_allclose(grads["w"].grad, g_pert["w"], rtol=1e-10, atol=1e-14)
  # The other choice gives a different gradient: the masks really differ.
  assert not np.allclose(grads["w"].grad, g_other["w"], rtol=1e-3)


def test_key_given_by_keyword():
  params, key, x = dropout_problem()
  grad_fn = fsam_optax.sam_value_and_grad(kw_loss, rng_arg="key")
  _, grads = grad_fn(params, fsam_optax.sam(RHO).init(params), x, key=key)
  _, g_pert = by_hand(params, key, jax.random.fold_in(key, 1), x)
  np.testing.assert_allclose(grads["w"].grad, g_pert["w"], rtol=1e-5)


def positional(grad_fn, params, state, key, x):
  return grad_fn(params, state, key, x)


def by_keyword(grad_fn, params, state, key, x):
  return grad_fn(params, state, x=x, key=key)


@pytest.mark.parametrize("mode", ["fresh", "same"])
@pytest.mark.parametrize("rng_arg", ["key", 1])
@pytest.mark.parametrize("call", [positional, by_keyword], ids=["positional", "keyword"])
def test_key_is_found_positionally_and_by_keyword(call, rng_arg, mode):
  """A name or a position finds the key however it is passed, and matches jax.grad."""
  params, key, x = dropout_problem()
  with jax.enable_x64(True):
    params = jax.tree.map(lambda v: v.astype(jnp.float64), params)
    x = x.astype(jnp.float64)
    grad_fn = fsam_optax.sam_value_and_grad(dropout_loss, rng_arg=rng_arg, second_pass_rng=mode)
    value, grads = call(grad_fn, params, fsam_optax.sam(RHO).init(params), key, x)
    # g' depends on the clean pass's key through the direction g / ||g||.
    _, g_pert = by_hand(params, key, (FRESH if mode == "fresh" else SAME)(key), x)
    want_value = dropout_loss(params, key, x)
  np.testing.assert_allclose(value, want_value, rtol=1e-12)
  np.testing.assert_allclose(grads["w"].grad, g_pert["w"], rtol=1e-10, atol=1e-14)


def test_key_is_found_through_var_keyword():
  """A name that ``fun`` takes through ``**kwargs`` is looked up among the call's keywords."""
  params, key, x = dropout_problem()
  grad_fn = fsam_optax.sam_value_and_grad(lambda p, x, **kw: kw_loss(p, x, **kw), rng_arg="key")
  _, grads = grad_fn(params, fsam_optax.sam(RHO).init(params), x, key=key)
  _, g_pert = by_hand(params, key, jax.random.fold_in(key, 1), x)
  np.testing.assert_allclose(grads["w"].grad, g_pert["w"], rtol=1e-5)


@pytest.mark.parametrize(
  ("kwargs", "message"),
  [
    (dict(rng_arg=0), r"`rng_arg` must be the position of the key among fun's arguments \(>= 1"),
    (dict(rng_arg=1.5), r"`rng_arg` must be the position"),
    (dict(rng_arg=1, second_pass_rng="new"), r"`second_pass_rng` must be 'fresh' or 'same'"),
    (dict(rng_arg="rng"), r"rng_arg='rng' is not a parameter of fun\(params, key, x, \*, rate"),
    (dict(rng_arg="rng", second_pass_rng="same"), r"rng_arg='rng' is not a parameter"),
    (dict(rng_arg="params"), r"rng_arg='params' names fun's first parameter, which receives"),
  ],
)
def test_bad_rng_options_are_refused(kwargs, message):
  with pytest.raises(ValueError, match=message):
    fsam_optax.sam_value_and_grad(dropout_loss, **kwargs)


def test_a_name_that_is_not_a_parameter_tells_the_fix():
  fix = r"pass as `rng_arg` the name of the parameter that receives the PRNG key, or its position"
  with pytest.raises(ValueError, match=fix):
    fsam_optax.sam_value_and_grad(kw_loss, rng_arg="rng")


KEY_0 = jax.random.key(3)


@pytest.mark.parametrize(
  ("fun", "rng_arg", "message"),
  [
    (lambda p, x: dropout_loss(p, KEY_0, x), 5, r"rng_arg=5 but fun received only 2"),
    (lambda p, x, **kw: dropout_loss(p, KEY_0, x), "key", r"rng_arg='key' names no keyword"),
    (lambda p, x, key=KEY_0: dropout_loss(p, key, x), "key", r"passed neither by keyword nor"),
  ],
  ids=["position", "var_keyword", "default"],
)
def test_rng_arg_missing_from_the_call_is_refused(fun, rng_arg, message):
  params, _, x = dropout_problem()
  grad_fn = fsam_optax.sam_value_and_grad(fun, rng_arg=rng_arg)
  with pytest.raises(ValueError, match=message):
    grad_fn(params, fsam_optax.sam(RHO).init(params), x)


# ---- a 1,000-leaf tree compiles, steps without recompiling and equals the reference;
# compile time against a hand-written SAM step is measured by benchmarks/large_tree.py ----

LEAVES = 1000


def test_thousand_leaf_tree_compiles_once_and_matches_reference():
  rng = np.random.default_rng(0)
  draw = lambda low, high: [rng.uniform(low, high, 2) for _ in range(LEAVES)]
  keys = [f"layer{i:04d}" for i in range(LEAVES)]
  p0, a1, c = draw(-1, 1), draw(0.5, 1.5), draw(0.05, 0.1)
  as_tree = lambda leaves: {
    k: jnp.asarray(x, jnp.float32) for k, x in zip(keys, leaves, strict=True)
  }
  tx = optax.chain(fsam_optax.fsam(**HYPER), optax.sgd(LR))
  step = sam_step(tx, quadratic_loss)

  params = as_tree(p0)
  state = tx.init(params)
  for a in (a1, [-x for x in a1]):
    params, state = step(params, state, as_tree(a), as_tree(c))
  assert step._cache_size() == 1  # the second step reuses the first compilation
  assert int(state[0].count) == 2

  _, ref = fsam_steps(p0, [a1, [-x for x in a1]], c, **HYPER, lr=LR)
  leaves = lambda tree: np.stack([np.asarray(tree[k]) for k in keys])
  np.testing.assert_allclose(leaves(params), np.stack(ref.params), rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(leaves(state[0].ema), np.stack(ref.ema), rtol=2e-5, atol=2e-6)
