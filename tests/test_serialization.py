"""Saving and restoring the optimizer state: flax.serialization and Orbax, bit for bit.

The state's static part (``PerturbationConfig``: adaptive mode and the mask
resolved to one bool per leaf) compares by value, so an optimizer built again
with the same options gives the same tree structure, and a restore target made
by its ``init`` supplies the config back. flax.serialization records it as an
empty dict; Orbax does not see it (it has no leaves).
"""

from __future__ import annotations

import pathlib
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import serialization
from flax.training import train_state

import fsam_optax
from tests.test_checkpoint import batch, init_params, loss_fn
from tests.train_step import sam_step

MASKS = {
  "none": lambda: None,
  "tree": lambda: {"w1": True, "b1": False, "w2": True},
  # A new lambda at every build: equal masks must give equal states anyway.
  "callable": lambda: lambda p: jax.tree_util.tree_map_with_path(lambda k, _: k[0].key != "b1", p),
}
SAVE_AT, STEPS = 2, 5


def make_tx(mask: str) -> optax.GradientTransformation:
  return optax.chain(
    fsam_optax.fsam(rho=0.2, sigma=1.0, lmbda=0.6, mask=MASKS[mask]()),
    optax.sgd(0.05, momentum=0.9),
  )


def train(tx, params, opt_state, start, stop):
  step = sam_step(tx, loss_fn)
  for i in range(start, stop):
    params, opt_state = step(params, opt_state, *batch(i))
  return params, opt_state


def assert_identical(x: Any, y: Any) -> None:
  assert jax.tree.structure(x) == jax.tree.structure(y)
  for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True):
    assert np.asarray(a).dtype == np.asarray(b).dtype
    np.testing.assert_array_equal(a, b)


def saved_and_expected(mask: str):
  tx = make_tx(mask)
  params, opt_state = train(tx, init_params(), tx.init(init_params()), 0, SAVE_AT)
  expected = train(tx, params, opt_state, SAVE_AT, STEPS)
  return (params, opt_state), expected


def resume(mask: str, restored: tuple[Any, Any]) -> tuple[Any, Any]:
  """Trains on from a restored state, with an optimizer built afresh."""
  return train(make_tx(mask), *restored, SAVE_AT, STEPS)


def fresh_target(mask: str) -> tuple[Any, Any]:
  params = jax.tree.map(jnp.zeros_like, init_params())
  return params, make_tx(mask).init(params)


@pytest.mark.parametrize("mask", MASKS)
def test_equal_options_give_equal_state_structures(mask):
  a, b = make_tx(mask).init(init_params()), make_tx(mask).init(init_params())
  assert jax.tree.structure(a) == jax.tree.structure(b)
  assert hash(a[0].config) == hash(b[0].config)


def test_prefix_tree_and_callable_masks_resolve_to_the_same_structure():
  states = [make_tx(m).init(init_params()) for m in ("tree", "callable")]
  assert jax.tree.structure(states[0]) == jax.tree.structure(states[1])
  assert states[0][0].config.mask == (False, True, True)  # leaves b1, w1, w2


FLAX_FORMATS = {
  "bytes": (serialization.to_bytes, serialization.from_bytes),
  "state_dict": (serialization.to_state_dict, serialization.from_state_dict),
}


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("fmt", FLAX_FORMATS)
def test_flax_serialization_round_trips_and_training_resumes_identically(fmt, mask):
  save, load = FLAX_FORMATS[fmt]
  saved, expected = saved_and_expected(mask)
  restored = load(fresh_target(mask), save(saved))
  assert_identical(restored, saved)
  assert_identical(resume(mask, restored), expected)


def test_flax_state_dict_does_not_record_the_static_config():
  saved, _ = saved_and_expected("tree")
  assert serialization.to_state_dict(saved)["1"]["0"]["config"] == {}


@pytest.mark.parametrize("mask", MASKS)
def test_orbax_round_trips_onto_the_abstract_target_of_init(mask):
  saved, expected = saved_and_expected(mask)
  with tempfile.TemporaryDirectory() as tmp:
    path = pathlib.Path(tmp) / "ckpt"
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(path, saved)
      ckptr.wait_until_finished()
      abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, fresh_target(mask))
      restored = ckptr.restore(path, abstract)
  assert_identical(restored, saved)
  assert_identical(resume(mask, restored), expected)


def test_flax_train_state_round_trips_through_to_bytes():
  tx = make_tx("callable")
  state = train_state.TrainState.create(apply_fn=None, params=init_params(), tx=tx)
  grad_fn = jax.jit(fsam_optax.sam_value_and_grad(loss_fn))
  for i in range(SAVE_AT):
    _, grads = grad_fn(state.params, state.opt_state, *batch(i))
    state = state.apply_gradients(grads=grads)
  target = train_state.TrainState.create(
    apply_fn=None, params=jax.tree.map(jnp.zeros_like, init_params()), tx=make_tx("callable")
  )
  restored = serialization.from_bytes(target, serialization.to_bytes(state))
  assert int(restored.step) == SAVE_AT
  assert_identical((restored.params, restored.opt_state), (state.params, state.opt_state))
