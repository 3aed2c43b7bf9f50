"""A 1,000-leaf pytree compiles, steps without recompiling, and equals the reference.

Compile time against a hand-written SAM step is measured by
``benchmarks/large_tree.py``, not asserted here.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax

import fsam_optax
from tests.jax_mlp import quadratic_loss
from tests.reference import fsam_steps
from tests.train_step import sam_step

LEAVES, LR = 1000, 0.1
HYPER = {"rho": 0.2, "sigma": 1.0, "lmbda": 0.6}


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
