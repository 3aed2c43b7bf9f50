"""Two runs with the same seeds give bit-identical results on CPU.

Each run builds its own optimizer and its own jitted step, so nothing is
shared between them but the seeds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

import fsam_optax
from tests.train_step import sam_step


def loss_fn(params: dict[str, jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  return jnp.mean((h @ params["w2"] - y) ** 2)


def run(seed: int, sharded: bool) -> list[jax.Array]:
  """Six F-SAM + AdamW steps on data drawn from ``seed``; returns every leaf."""
  k_w1, k_w2, k_data = jax.random.split(jax.random.key(seed), 3)
  params = {
    "w1": jax.random.normal(k_w1, (4, 16)) / 2,
    "b1": jnp.zeros((1, 16)),
    "w2": jax.random.normal(k_w2, (16, 1)) / 4,
  }
  tx = optax.chain(fsam_optax.fsam(rho=0.2, sigma=1.0, lmbda=0.6), optax.adamw(1e-2))
  opt_state = tx.init(params)
  step = sam_step(tx, loss_fn, outputs=("loss",))

  losses = []
  for i in range(6):
    x = jax.random.normal(jax.random.fold_in(k_data, i), (32, 4))
    y = jnp.sin(x.sum(axis=1, keepdims=True))
    if sharded:  # the batch split over the 8 CPU devices: cross-device reductions
      mesh = jax.make_mesh((8,), ("batch",), axis_types=(AxisType.Auto,))
      x, y = (jax.device_put(v, NamedSharding(mesh, PartitionSpec("batch"))) for v in (x, y))
    params, opt_state, loss = step(params, opt_state, x, y)
    losses.append(loss)
  return jax.tree.leaves((params, opt_state, losses))


@pytest.mark.parametrize("sharded", [False, True])
def test_same_seed_gives_bit_identical_runs(sharded):
  first, second = run(0, sharded), run(0, sharded)
  for x, y in zip(first, second, strict=True):
    np.testing.assert_array_equal(x, y)
  # The seed matters: another one gives another trajectory.
  assert not np.array_equal(first[-1], run(1, sharded)[-1])
