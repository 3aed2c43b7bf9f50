"""Bad input gets a ValueError that names the argument and says what to do.

A layout that F-SAM cannot honour, or that the arguments misdescribe, is refused by name.
(Misplaced Optax wrappers are refused in tests/test_wrappers.py, beside the supported forms.)
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import fsam_optax
from tests.jax_mlp import megatron_loss, mlp_loss
from tests.test_layouts import MODEL_SPECS, init


def loss(params):
  return jnp.sum(params["w"] ** 2)


PARAMS = {"w": jnp.arange(3.0)}


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(rho=-0.1), "`rho` must be a radius >= 0, got -0.1"),
    (dict(rho=math.nan), "`rho` must be a radius >= 0, got nan"),
    (dict(sigma=-1.0), "`sigma` must be >= 0, got -1.0"),
    (dict(lmbda=1.0), r"`lmbda` must be in \[0, 1\), got 1.0"),
    (dict(lmbda=-0.5), r"`lmbda` must be in \[0, 1\), got -0.5"),
    (dict(eps=0.0), "`eps` must be > 0, got 0.0"),
    (dict(eps=jnp.asarray(-1.0)), "`eps` must be > 0, got -1.0"),
  ],
)
def test_out_of_range_hyperparameters_raise_at_construction(kwargs, message):
  with pytest.raises(ValueError, match=message):
    fsam_optax.fsam(**kwargs)


def test_sam_validates_too_and_names_itself():
  with pytest.raises(ValueError, match=r"^sam: `rho` must be a radius >= 0"):
    fsam_optax.sam(rho=-1.0)


def test_non_scalar_hyperparameter_is_refused():
  with pytest.raises(ValueError, match=r"fsam: expected a scalar hyperparameter `rho`, got shape"):
    fsam_optax.fsam(rho=jnp.ones(2))


@pytest.mark.parametrize("name", ["sigma", "lmbda", "eps"])
def test_hyperparameters_but_rho_take_no_schedule(name):
  schedule = optax.constant_schedule(0.5)
  with pytest.raises(ValueError, match=f"`{name}` must be a number or a scalar array, not a sch"):
    fsam_optax.fsam(**{name: schedule})
  fsam_optax.fsam(rho=schedule)  # accepted


def test_traced_hyperparameters_are_accepted_unchecked():
  # Under inject_hyperparams inside jit the values are tracers: nothing to check.
  tx = optax.inject_hyperparams(fsam_optax.fsam)(rho=0.1)
  state = jax.jit(tx.init)(PARAMS)
  assert float(state.hyperparams["rho"]) == pytest.approx(0.1)


def test_helper_without_a_sam_state_says_what_it_got_and_how_to_build_the_optimizer():
  tx = optax.sgd(0.1, momentum=0.9)
  with pytest.raises(
    ValueError,
    match=r"opt_state \(of type `tuple`\) holds no SAM-family state.*"
    r"optax\.chain\(fsam_optax\.fsam",
  ):
    fsam_optax.sam_value_and_grad(loss)(PARAMS, tx.init(PARAMS))


def test_plain_gradients_fed_to_fsam_say_to_use_the_helper():
  tx = optax.chain(fsam_optax.fsam(), optax.sgd(0.1))
  with pytest.raises(ValueError, match=r"fsam received plain gradients.*sam_value_and_grad"):
    tx.update(jax.grad(loss)(PARAMS), tx.init(PARAMS), PARAMS)


def test_fsam_after_another_transformation_says_to_move_it_first():
  tx = optax.chain(optax.clip_by_global_norm(1.0), fsam_optax.fsam(), optax.sgd(0.1))
  with pytest.raises(ValueError, match=r"fsam must be the first transformation.*position 1"):
    fsam_optax.sam_value_and_grad(loss)(PARAMS, tx.init(PARAMS))


def test_fsam_not_first_in_named_chain_is_caught():
  tx = optax.named_chain(("clip", optax.clip(1.0)), ("fsam", fsam_optax.fsam()))
  with pytest.raises(ValueError, match=r"fsam must be the first transformation.*entry 'fsam'"):
    fsam_optax.sam_value_and_grad(loss)(PARAMS, tx.init(PARAMS))


def test_two_fsam_states_are_refused():
  tx = optax.chain(fsam_optax.fsam(), fsam_optax.sam())
  with pytest.raises(ValueError, match=r"holds 2 SAM-family states \(fsam, sam\)"):
    fsam_optax.sam_value_and_grad(loss)(PARAMS, tx.init(PARAMS))


def test_sam_gradients_fed_to_an_fsam_state_are_refused():
  sam_state = optax.chain(fsam_optax.sam(), optax.sgd(0.1)).init(PARAMS)
  _, grads = fsam_optax.sam_value_and_grad(loss)(PARAMS, sam_state)
  tx = optax.chain(fsam_optax.fsam(), optax.sgd(0.1))
  with pytest.raises(ValueError, match="these gradients carry no `ema` for the state"):
    tx.update(grads, tx.init(PARAMS), PARAMS)


def test_params_that_do_not_match_the_state_are_refused():
  tx = optax.chain(fsam_optax.fsam(), optax.sgd(0.1))
  other = {"w": jnp.zeros(3), "v": jnp.zeros(2)}
  with pytest.raises(
    ValueError, match="params have 2 leaves but the `ema` of the fsam state covers 1"
  ):
    fsam_optax.sam_value_and_grad(lambda p: loss(p) + jnp.sum(p["v"]))(other, tx.init(PARAMS))


@pytest.mark.parametrize(
  "kwargs, error, message",
  [
    (dict(perturbation="local"), ValueError, "`perturbation` must be 'global' or 'per_device'"),
    (dict(perturbation="per_device"), ValueError, "needs `axis_name`"),
    (dict(clip_clean_grad=0.0), ValueError, "`clip_clean_grad` must be a norm > 0, got 0.0"),
  ],
)
def test_helper_arguments_are_checked(kwargs, error, message):
  with pytest.raises(error, match=message):
    fsam_optax.sam_value_and_grad(loss, **kwargs)


def test_helper_needs_a_callable():
  with pytest.raises(TypeError, match="`fun` must be callable"):
    fsam_optax.sam_value_and_grad(3.0)


# ---- every method names itself ----
# Each argument check and misuse, for each method: the message names the method as the
# user wrote it (``sam`` builds an FSAMState, yet its errors say ``sam``) and speaks of
# no buffer that the method's state lacks.

FAMILY = {
  "fsam": fsam_optax.fsam,
  "sam": fsam_optax.sam,
  "gsam": fsam_optax.gsam,
  "vasso": fsam_optax.vasso,
  "looksam": fsam_optax.looksam,
}
BUFFERS = {"fsam": ["`ema`"], "vasso": ["`ema`"], "looksam": ["`g_v`"]}
ALL_BUFFERS = ["`ema`", "`g_v`", "F-SAM"]
SCHEDULE = [  # fsam's and sam's schedule of SAM steps
  dict(every=0),
  dict(every="2"),
  dict(probability=0.0),
  dict(probability=1.5),
  dict(every=2, probability=0.5),
  dict(seed=1),
  dict(probability=0.5, seed=-1),
]
OWN_ARGUMENTS = {
  "fsam": [dict(sigma=-1.0), dict(lmbda=1.0), dict(lmbda=jnp.ones(2)), *SCHEDULE],
  "sam": SCHEDULE,
  "gsam": [dict(alpha=1.5), dict(alpha=optax.constant_schedule(0.1))],
  "vasso": [dict(theta=-0.1), dict(theta=jnp.ones(2))],
  "looksam": [dict(alpha=-1.0), dict(every=0), dict(every=2.5)],
}
TWO_LEAVES = {"w": jnp.arange(3.0), "v": jnp.ones(2)}
GRAD_FN = fsam_optax.sam_value_and_grad(lambda p: sum(jnp.sum(x**2) for x in jax.tree.leaves(p)))


def named(message: str, name: str) -> bool:
  """Whether ``message`` names ``name`` as a word (``fsam`` and ``fsam_optax`` are not ``sam``)."""
  return re.search(rf"(?<![A-Za-z_]){name}(?![A-Za-z_])", message) is not None


def misuses(name: str) -> list[tuple[str, Callable[[], Any]]]:
  """Every refused use of the method ``name``: a label and a call that raises ValueError."""
  build, sgd = FAMILY[name], optax.sgd(0.1)
  arguments = [dict(rho=-1.0), dict(rho=jnp.ones(2)), dict(eps=0.0)]
  arguments += [dict(eps=optax.constant_schedule(0.1)), *OWN_ARGUMENTS[name]]
  arguments += [dict(mask={"w": jnp.array([True, False, True])})]
  cases = [(f"{name}(**{kw})", functools.partial(build, **kw)) for kw in arguments]
  helper = lambda tx: lambda: GRAD_FN(PARAMS, tx.init(PARAMS))
  chain = optax.chain(build(), sgd)
  other = optax.chain(fsam_optax.sam() if name == "gsam" else fsam_optax.gsam(), sgd)
  every = dict(every=2) if name in ("fsam", "sam", "looksam") else {}
  optimizer = nnx.Optimizer(nnx.Linear(3, 1, rngs=nnx.Rngs(0)), chain, wrt=nnx.Param)
  cases += [
    ("mask of another structure", lambda: build(mask={"v": True}).init(PARAMS)),
    (
      "params unlike the state's",
      lambda: GRAD_FN(TWO_LEAVES, build(mask={"w": True}).init(PARAMS)),
    ),
    ("not first", helper(optax.chain(optax.clip(1.0), build(), sgd))),
    ("not first, named", helper(optax.named_chain(("c", optax.clip(1.0)), ("m", build())))),
    ("two methods", helper(optax.chain(build(), other))),
    ("inside apply_if_finite", helper(optax.apply_if_finite(chain, 2))),
    ("apply_if_finite after", helper(optax.chain(build(), optax.apply_if_finite(sgd, 2)))),
    (
      "apply_if_finite after, scheduled",
      helper(optax.chain(build(**every), optax.apply_if_finite(sgd, 2))),
    ),
    ("inside masked", helper(optax.masked(chain, {"w": True}))),
    ("inside MultiSteps", helper(optax.MultiSteps(chain, every_k_schedule=2))),
    ("plain gradients", lambda: chain.update(jax.grad(loss)(PARAMS), chain.init(PARAMS))),
    ("no SAM state", helper(optax.adam(0.1))),
    ("nnx.state(optimizer)", lambda: GRAD_FN(PARAMS, nnx.state(optimizer))),
  ]
  if name in BUFFERS:  # gsam's gradients carry nothing for the method's buffer
    grads = lambda: GRAD_FN(PARAMS, other.init(PARAMS))[1]
    cases += [("gsam's gradients", lambda: chain.update(grads(), chain.init(PARAMS)))]
  return cases


# What the messages that list the methods (rather than name one) must also say.
LISTING = {
  "no SAM state": r"opt_state \(of type `tuple`\) holds no SAM-family state.*fsam_optax\.fsam",
  "nnx.state(optimizer)": r"of type `flax\.nnx\.State`.*Pass the `nnx\.Optimizer` itself or "
  r"`optimizer\.opt_state`",
  "two methods": r"holds 2 SAM-family states \((\w+), (\w+)\)",
}


@pytest.mark.parametrize("name", list(FAMILY))
def test_every_error_names_the_method_and_only_its_buffers(name):
  lacks = [word for word in ALL_BUFFERS if word not in BUFFERS.get(name, [])]
  for label, call in misuses(name):
    with pytest.raises(ValueError) as info:
      call()
    message = str(info.value)
    assert named(message, name), (label, message)
    assert not [word for word in lacks if word in message], (label, message)
    if label in LISTING:
      assert re.search(LISTING[label], message), (label, message)
      continue
    others = [m for m in FAMILY if m != name and named(message, m)]
    assert not others, (label, message)


# ---- layouts ----

MESH = jax.make_mesh((2, 4), ("data", "model"))


def grads_on_mesh(loss, specs, check_vma=True, **grad_kwargs):
  """One F-SAM gradient inside shard_map on MESH, params laid out by ``specs``."""
  tx = optax.chain(fsam_optax.fsam(), optax.sgd(0.1))
  params = init()
  opt_state = tx.init(params)
  grad_fn = fsam_optax.sam_value_and_grad(loss, **grad_kwargs)
  x, y = jnp.ones((8, 5)), jnp.ones((8, 3))
  put = lambda tree, s: jax.device_put(tree, NamedSharding(MESH, s))
  params = jax.tree.map(put, params, specs)
  body = lambda p, s, x, y: grad_fn(p, s, x, y)[0]
  mapped = jax.shard_map(
    body,
    mesh=MESH,
    in_specs=(specs, P(), P("data"), P("data")),
    out_specs=P(),
    check_vma=check_vma,
  )
  return jax.jit(mapped)(params, opt_state, put(x, P("data")), put(y, P("data")))


def test_split_params_without_param_specs_are_refused():
  with pytest.raises(ValueError, match=r"manual mesh axes \['model'\].*`param_specs`"):
    grads_on_mesh(megatron_loss, MODEL_SPECS, axis_name="data")


def test_a_leaf_split_on_an_axis_its_spec_omits_is_named():
  wrong = {**MODEL_SPECS, "b0": P()}
  with pytest.raises(
    ValueError, match=r"\['b0'\] differs between devices along \['model'\].*splits it over \[\]"
  ):
    grads_on_mesh(megatron_loss, MODEL_SPECS, axis_name="data", param_specs=wrong)


def test_a_replicated_leaf_given_a_split_spec_is_named():
  wrong = {**MODEL_SPECS, "b1": P("model")}
  with pytest.raises(ValueError, match=r"splits the parameter \['b1'\].*same on every device"):
    grads_on_mesh(megatron_loss, MODEL_SPECS, axis_name="data", param_specs=wrong)


def test_an_axis_not_in_the_mesh_is_named():
  wrong = {**MODEL_SPECS, "w0": P(None, "tensor")}
  with pytest.raises(ValueError, match=r"\['w0'\] over 'tensor', which is not a mapped axis"):
    grads_on_mesh(megatron_loss, MODEL_SPECS, axis_name="data", param_specs=wrong)


def test_a_data_axis_not_in_scope_is_named():
  with pytest.raises(ValueError, match=r"`axis_name` names 'batch', which is not a mapped axis"):
    grads_on_mesh(megatron_loss, MODEL_SPECS, axis_name="batch", param_specs=MODEL_SPECS)


def test_a_spec_tree_that_does_not_match_the_params_is_refused():
  with pytest.raises(ValueError, match=r"`param_specs` must be a tree of PartitionSpec"):
    grads_on_mesh(megatron_loss, MODEL_SPECS, axis_name="data", param_specs={"w0": P()})


def test_a_spec_longer_than_its_leaf_is_named():
  wrong = {**MODEL_SPECS, "b1": P(None, None)}
  with pytest.raises(ValueError, match=r"\['b1'\] of shape \(3,\): more entries"):
    grads_on_mesh(megatron_loss, MODEL_SPECS, axis_name="data", param_specs=wrong)


def test_check_vma_false_is_refused_with_split_params():
  with pytest.raises(ValueError, match=r"check_vma=False.*use check_vma=True"):
    grads_on_mesh(
      megatron_loss, MODEL_SPECS, check_vma=False, axis_name="data", param_specs=MODEL_SPECS
    )


def test_per_device_perturbation_with_fsdp_is_refused():
  specs = {**MODEL_SPECS, "b0": P(("data", "model"))}
  with pytest.raises(ValueError, match=r"'per_device' cannot be honoured.*\['b0'\] over the data"):
    grads_on_mesh(
      megatron_loss, specs, axis_name="data", param_specs=specs, perturbation="per_device"
    )


def test_param_specs_outside_shard_map_point_to_jit():
  tx = optax.chain(fsam_optax.fsam(), optax.sgd(0.1))
  params = init()
  grad_fn = fsam_optax.sam_value_and_grad(mlp_loss, param_specs=MODEL_SPECS)
  with pytest.raises(ValueError, match=r"not a mapped axis here.*leave `param_specs` out"):
    grad_fn(params, tx.init(params), jnp.ones((8, 5)), jnp.ones((8, 3)))


@pytest.mark.parametrize(
  ("kwargs", "match"),
  [
    (dict(average_aux=True), "needs has_aux=True and the data axes"),
    (dict(average_aux=True, has_aux=True), "needs has_aux=True and the data axes"),
    (dict(micro_batches=0), "`micro_batches` must be a positive int"),
    (dict(micro_batches=2.0), "`micro_batches` must be a positive int"),
    (dict(axis_name=("data", 3)), "`axis_name` must be an axis name or a tuple"),
  ],
)
def test_bad_options_are_refused_when_building(kwargs, match):
  with pytest.raises(ValueError, match=match):
    fsam_optax.sam_value_and_grad(mlp_loss, **kwargs)


def test_integer_aux_cannot_be_averaged():
  loss = lambda p, x: (jnp.sum(p * x), {"count": jnp.int32(1)})
  grad_fn = fsam_optax.sam_value_and_grad(loss, has_aux=True, axis_name="i", average_aux=True)
  tx = optax.chain(fsam_optax.sam(), optax.sgd(0.1))
  with pytest.raises(ValueError, match=r"aux leaf at \['count'\] is int32"):
    jax.pmap(grad_fn, "i", in_axes=(None, None, 0))(
      jnp.ones(2), tx.init(jnp.ones(2)), jnp.ones((8, 2))
    )


def test_micro_batches_must_divide_the_batch():
  tx = optax.chain(fsam_optax.fsam(), optax.sgd(0.1))
  params = init()
  grad_fn = fsam_optax.sam_value_and_grad(mlp_loss, micro_batches=3)
  with pytest.raises(
    ValueError, match=r"positional argument \[0\] has shape \(8, 5\).*not a multiple of 3"
  ):
    grad_fn(params, tx.init(params), jnp.ones((8, 5)), jnp.ones((8, 3)))


@pytest.mark.parametrize(
  "params, where",
  [
    ({"w": jnp.ones(2), "steps": jnp.array(3)}, r"\['steps'\] \(dtype int32\)"),
    ({"w": jnp.ones(2), "name": "mlp"}, r"\['name'\] \(str\)"),
  ],
)
def test_plain_tree_leaf_that_cannot_be_differentiated_is_named_with_the_fix(params, where):
  grad_fn = fsam_optax.sam_value_and_grad(lambda p: jnp.sum(p["w"] ** 2))
  opt_state = optax.chain(fsam_optax.sam(), optax.sgd(0.1)).init({"w": params["w"]})
  with pytest.raises(ValueError, match=rf"leaf at {where} cannot be differentiated.*nnx.split"):
    grad_fn(params, opt_state)
