"""SAM on a large batch in micro-batches: one perturbation from the whole batch's gradient.

``micro_batches=k`` averages the clean gradient over k micro-batches, perturbs
once, and averages the perturbed gradient over the same micro-batches, each
pass a ``lax.scan``. For a mean loss this is the whole batch in one call. (It
is not ``optax.MultiSteps``, which perturbs every micro-batch with its own
gradient; tests/test_accumulation.py keeps that meaning.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

import fsam_optax
from tests.jax_mlp import mlp_loss
from tests.test_layouts import (
  EXPLICIT,
  assert_same_run,
  init,
  make_step,
  make_tx,
  mesh_of,
  place_tree,
  run_shard_map,
  single_device,
  train,
)


def test_micro_batches_equal_the_whole_batch_in_one_call():
  tx = make_tx()
  with jax.enable_x64(True):
    params = init()
    run = train(jax.jit(make_step(mlp_loss, tx, micro_batches=4)), params, tx.init(params))
    assert_same_run(run, single_device())


def test_micro_batches_inside_shard_map_equal_the_global_batch():
  mesh = mesh_of((8,), ("data",), EXPLICIT)
  tx = make_tx()
  step = make_step(mlp_loss, tx, axis_name="data", micro_batches=2)
  step = jax.jit(
    jax.shard_map(
      step, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")), out_specs=(P(), P(), P(), P())
    )
  )
  with jax.enable_x64(True):
    params = init()
    run = train(step, params, tx.init(params), lambda b: place_tree(mesh, b, P("data")))
    assert_same_run(run, single_device())


def test_micro_batches_on_a_data_by_model_mesh_equal_the_global_batch():
  with jax.enable_x64(True):
    run = run_shard_map((2, 4), ("data", "model"), micro_batches=2)
    assert_same_run(run, single_device())


def test_aux_gets_one_row_per_micro_batch():
  loss = lambda p, x: (jnp.mean((x @ p) ** 2), jnp.mean(x, axis=0))
  grad_fn = fsam_optax.sam_value_and_grad(loss, has_aux=True, micro_batches=4)
  tx = make_tx()
  params, x = jnp.ones(3), jnp.arange(24.0).reshape(8, 3)
  (_, aux), _ = jax.jit(grad_fn)(params, tx.init(params), x)
  np.testing.assert_array_equal(aux, x.reshape(4, 2, 3).mean(axis=1))
