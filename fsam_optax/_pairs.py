"""Plain gradient trees from the ``SAMGrad`` pairs that the helper returns."""

from __future__ import annotations

from typing import Any

import jax

from fsam_optax._fsam import SAMGrad, flatten_pairs


def _pairs(grads: Any, fn: str) -> tuple[list[SAMGrad], Any]:
  return flatten_pairs(
    grads,
    f"fsam_optax.{fn}: expected the gradients of sam_value_and_grad, a tree "
    "with a SAMGrad (perturbed, clean) pair at each leaf.",
  )


def perturbed_grads(grads: Any) -> Any:
  """The gradients at the perturbed weights, ``g'``, as a plain tree.

  This is what the optimizers after :func:`fsam_optax.fsam` receive. Use it
  (not the pair tree) wherever a plain gradient tree is expected, e.g.
  ``optax.global_norm``, which would otherwise mix both gradients of each pair.

  Example:
    >>> import jax.numpy as jnp, optax, fsam_optax
    >>> params = {"w": jnp.array([3.0, 4.0])}
    >>> tx = optax.chain(fsam_optax.fsam(rho=0.1), optax.sgd(0.1))
    >>> grad_fn = fsam_optax.sam_value_and_grad(lambda p: jnp.sum(p["w"] ** 2) / 2)
    >>> _, grads = grad_fn(params, tx.init(params))
    >>> print(fsam_optax.perturbed_grads(grads)["w"])
    [3.06 4.08]
  """
  pairs, treedef = _pairs(grads, "perturbed_grads")
  return jax.tree.unflatten(treedef, [p.perturbed for p in pairs])


def clean_grads(grads: Any) -> Any:
  """The gradients at the unperturbed weights, ``g``, as a plain tree.

  This is the gradient that feeds the moving average (after the helper's
  optional ``clip_clean_grad``). Plain SAM keeps no moving average, so its
  pairs carry no clean gradient: ask for ``return_diagnostics=True`` for its
  norm instead.

  Example:
    >>> import jax, jax.numpy as jnp, optax, fsam_optax
    >>> loss = lambda p: jnp.sum(jnp.sin(p))
    >>> params = jnp.array([0.5, 1.0])
    >>> opt_state = optax.chain(fsam_optax.fsam(), optax.sgd(0.1)).init(params)
    >>> _, grads = fsam_optax.sam_value_and_grad(loss)(params, opt_state)
    >>> bool(jnp.array_equal(fsam_optax.clean_grads(grads), jax.grad(loss)(params)))
    True
  """
  pairs, treedef = _pairs(grads, "clean_grads")
  if any(p.clean is None for p in pairs):
    raise ValueError(
      "fsam_optax.clean_grads: these pairs carry no clean gradient, because the "
      "state keeps no moving average (plain SAM, or fsam with sigma=0). Its norm "
      "is in the diagnostics: sam_value_and_grad(..., return_diagnostics=True)."
    )
  return jax.tree.unflatten(treedef, [p.clean for p in pairs])
