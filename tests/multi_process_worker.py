"""One of two processes training data-parallel F-SAM; run by tests/test_layouts.py.

Usage: python -m tests.multi_process_worker COORDINATOR_ADDRESS PROCESS_ID OUT_FILE.npz
The parent sets the environment: 2 CPU devices (XLA_FLAGS) and float64 (JAX_ENABLE_X64).
Importing this module (as pytest's doctest collection does) changes nothing.
"""

from __future__ import annotations

import functools
import sys

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tests.jax_mlp import mlp_loss
from tests.test_layouts import data, init, make_tx
from tests.train_step import sam_step


def main(address: str, process_id: int, out: str) -> None:
  jax.distributed.initialize(address, num_processes=2, process_id=process_id)
  assert jax.config.jax_enable_x64
  assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 4, 2)
  mesh = jax.make_mesh((4,), ("data",))
  replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

  def local_rows(batch):
    # Each process loads only its half of the global batch.
    half = batch[0].shape[0] // 2
    rows = slice(process_id * half, (process_id + 1) * half)
    return tuple(jax.make_array_from_process_local_data(split, a[rows]) for a in batch)

  tx = make_tx()
  specs = dict(mesh=mesh, in_specs=(P(), P(), P("data"), P("data")), out_specs=P())
  steps = {
    "jit": jax.jit(sam_step(tx, mlp_loss, outputs=("loss",), jit=False), out_shardings=replicated),
    "shard_map": sam_step(
      tx, mlp_loss, outputs=("loss",), mapped=functools.partial(jax.shard_map, **specs),
      axis_name="data",
    ),
  }  # fmt: skip
  results = {}
  for name, step in steps.items():
    params = jax.device_put(init(), replicated)
    opt_state = jax.device_put(tx.init(params), replicated)
    losses = []
    for batch in data():
      params, opt_state, loss = step(params, opt_state, *local_rows(batch))
      losses.append(loss)
    leaves = jax.tree.leaves((params, opt_state, losses))
    results |= {f"{name}_{i}": np.asarray(leaf) for i, leaf in enumerate(leaves)}
  np.savez(out, **results)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
