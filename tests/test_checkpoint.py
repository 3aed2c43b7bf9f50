"""Checkpoint and resume with Orbax: the resumed run is bit-identical to the uninterrupted one.

The test trains a few steps, saves params and the whole optimizer state, runs
on to the end, and compares with a fresh Python process (this file, run as a
script) that restores the checkpoint and runs the same remaining steps.

Restoring needs an abstract target built from ``tx.init(params)``: the F-SAM
state holds a static, leafless node (``PerturbationConfig``) and NamedTuples
that a checkpoint does not record, so only the target can rebuild them.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import fsam_optax
from tests.train_step import sam_step

SAVE_AT, STEPS = 3, 6
REPO = pathlib.Path(__file__).resolve().parents[1]


def make_optimizer(variant: str) -> optax.GradientTransformation:
  if variant == "chain":
    # A schedule for rho makes the restored count matter.
    rho = optax.linear_schedule(0.2, 0.05, transition_steps=STEPS)
    fsam = fsam_optax.fsam(
      rho=rho, sigma=1.0, lmbda=0.6, mask={"w1": True, "b1": False, "w2": True}
    )
  else:
    fsam = optax.inject_hyperparams(fsam_optax.fsam)(rho=0.2, sigma=1.0, lmbda=0.6)
  return optax.chain(fsam, optax.sgd(0.05, momentum=0.9))


def init_params() -> dict[str, jax.Array]:
  k1, k2 = jax.random.split(jax.random.key(0))
  return {
    "w1": jax.random.normal(k1, (4, 8)) / 2,
    "b1": jnp.zeros((1, 8)),
    "w2": jax.random.normal(k2, (8, 1)) / 3,
  }


def batch(step: int) -> tuple[jax.Array, jax.Array]:
  x = jax.random.normal(jax.random.fold_in(jax.random.key(1), step), (16, 4))
  return x, jnp.sin(x.sum(axis=1, keepdims=True))


def loss_fn(params: dict[str, jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  return jnp.mean((h @ params["w2"] - y) ** 2)


def train(variant: str, params: Any, opt_state: Any, start: int, stop: int) -> tuple[Any, Any]:
  step = sam_step(make_optimizer(variant), loss_fn)
  for i in range(start, stop):
    params, opt_state = step(params, opt_state, *batch(i))
    if variant == "inject" and i == 1:
      # A hand-set hyperparameter must survive the checkpoint too.
      opt_state[0].hyperparams["rho"] = jnp.asarray(0.1)
  return params, opt_state


def restore(path: pathlib.Path, variant: str) -> dict[str, Any]:
  """Restores ``{"params", "opt_state"}`` onto a target made by ``tx.init``."""
  params = init_params()
  target = {"params": params, "opt_state": make_optimizer(variant).init(params)}
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(path, abstract)


def resume_in_this_process(ckpt: str, variant: str, out: str) -> None:
  """The fresh process: restore, train the remaining steps, save the leaves."""
  state = restore(pathlib.Path(ckpt), variant)
  result = train(variant, state["params"], state["opt_state"], SAVE_AT, STEPS)
  np.savez(out, *[np.asarray(x) for x in jax.tree.leaves(result)])


@pytest.fixture
def scratch_dir() -> Iterator[pathlib.Path]:
  # Not pytest's tmp_path: concurrent pytest sessions on one machine prune
  # each other's numbered base directories, checkpoints included.
  with tempfile.TemporaryDirectory() as path:
    yield pathlib.Path(path)


@pytest.mark.parametrize("variant", ["chain", "inject"])
def test_resume_in_fresh_process_is_bit_identical(variant, scratch_dir):
  tx = make_optimizer(variant)
  params = init_params()
  params, opt_state = train(variant, params, tx.init(params), 0, SAVE_AT)
  ckpt = scratch_dir / "ckpt"
  saved = {"params": params, "opt_state": opt_state}
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(ckpt, saved)
    ckptr.wait_until_finished()

  # Restored in this process, the state is the saved one, types and all.
  restored = restore(ckpt, variant)
  assert jax.tree.structure(restored["opt_state"]) == jax.tree.structure(opt_state)
  for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(saved), strict=True):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(x, y)
  fsam_state = restored["opt_state"][0]
  if variant == "inject":
    assert float(fsam_state.hyperparams["rho"]) == pytest.approx(0.1)
    fsam_state = fsam_state.inner_state
  assert isinstance(fsam_state, fsam_optax.FSAMState)
  assert int(fsam_state.count) == SAVE_AT

  expected = jax.tree.leaves(train(variant, params, opt_state, SAVE_AT, STEPS))
  out = scratch_dir / "resumed.npz"
  # A fresh interpreter with one CPU device: nothing carries over but the files.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  subprocess.run(
    [sys.executable, "-m", "tests.test_checkpoint", str(ckpt), variant, str(out)],
    cwd=REPO,
    env=env,
    check=True,
    timeout=300,
  )
  with np.load(out) as resumed:
    got = [resumed[f"arr_{i}"] for i in range(len(resumed.files))]
  assert len(got) == len(expected)
  for x, y in zip(got, expected, strict=True):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(x, np.asarray(y))  # bit for bit, not approximately


if __name__ == "__main__":
  resume_in_this_process(*sys.argv[1:])
