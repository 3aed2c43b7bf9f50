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
from tests.two_processes import join


def main(address: str, process_id: int, out: str) -> None:
  mesh, local_rows = join(address, process_id)
  replicated = NamedSharding(mesh, P())
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
