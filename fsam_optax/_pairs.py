"""The gradient pair that the helper returns and the transformation consumes.

:func:`fsam_optax.sam_value_and_grad` returns, at each leaf of the params, a
:class:`SAMGrad` holding the gradient the rest of the chain receives (for
most methods the gradient at the perturbed weights) and what the method's
state is fed; the SAM-family transformation at the front of the chain turns
the pairs into the plain gradients the rest of the chain receives.
"""

from __future__ import annotations

from typing import Any, NamedTuple, NoReturn

import jax


class SAMGrad(NamedTuple):
  """The gradient pair that :func:`sam_value_and_grad` returns for one leaf.

  Attributes:
    perturbed: what the optimizers after the method in the chain receive:
      the gradient ``g'`` at the perturbed weights ``theta + e`` (SAM, F-SAM,
      VaSSO, LookSAM's SAM steps), GSAM's ``g' - alpha * vertical``, LookSAM's
      reconstructed gradient on its one-pass steps.
    clean: gradient ``g`` at ``theta``, fed into F-SAM's moving average;
      ``None`` when the method's update does not read it.
    carry: what the method keeps from this step for the next ones (VaSSO's
      new moving average, LookSAM's component ``g_v``); ``None`` for the others.
  """

  perturbed: jax.Array
  clean: jax.Array | None
  carry: jax.Array | None = None

  # Arithmetic on a pair would silently stack the two gradients into one
  # array (jnp treats a tuple as a sequence), or repeat or concatenate the
  # tuple: refuse it with what to do.
  def __jax_array__(self, *args: Any, **kwargs: Any) -> NoReturn:
    raise TypeError(_PAIR_AS_ARRAY)

  def __array__(self, *args: Any, **kwargs: Any) -> NoReturn:
    raise TypeError(_PAIR_AS_ARRAY)

  def __add__(self, other: Any) -> NoReturn:
    raise TypeError(_PAIR_AS_ARRAY)

  def __radd__(self, other: Any) -> NoReturn:
    raise TypeError(_PAIR_AS_ARRAY)

  def __mul__(self, other: Any) -> NoReturn:
    raise TypeError(_PAIR_AS_ARRAY)

  def __rmul__(self, other: Any) -> NoReturn:
    raise TypeError(_PAIR_AS_ARRAY)


_PAIR_AS_ARRAY = (
  "a fsam_optax.SAMGrad (perturbed, clean) pair was used as an array. Pass the "
  "helper's gradients unchanged to an optimizer whose chain starts with the SAM-family "
  "transformation (fsam, sam, gsam, vasso or looksam), or "
  "take the plain trees with fsam_optax.perturbed_grads(grads) / "
  "fsam_optax.clean_grads(grads)."
)


def flatten_pairs(grads: Any, error: str) -> tuple[list[SAMGrad], Any]:
  """The ``SAMGrad`` pairs of the helper's gradients and their treedef.

  Raises ``ValueError(error)`` unless every leaf is a pair.
  """
  is_pair = lambda x: isinstance(x, SAMGrad)
  pairs, treedef = jax.tree.flatten(grads, is_leaf=is_pair)
  if not all(is_pair(p) for p in pairs):
    raise ValueError(error)
  return pairs, treedef


def split_grads(updates: Any, method: str) -> tuple[list[jax.Array], list[Any], list[Any], Any]:
  """The helper's gradients: lists of their ``perturbed``, ``clean``, ``carry`` leaves; a treedef.

  ``method`` names the transformation in the error raised for plain gradients.
  """
  pairs, treedef = flatten_pairs(
    updates,
    f"{method} received plain gradients. Compute them with "
    "`fsam_optax.sam_value_and_grad(loss_fn)(params, opt_state, ...)`, "
    f"which returns the (perturbed, clean) pairs that {method} consumes, "
    f"and place {method} first in the chain.",
  )
  fields = ([p.perturbed for p in pairs], [p.clean for p in pairs], [p.carry for p in pairs])
  return (*fields, treedef)


def _pairs(grads: Any, fn: str) -> tuple[list[SAMGrad], Any]:
  return flatten_pairs(
    grads,
    f"fsam_optax.{fn}: expected the gradients of sam_value_and_grad, a tree "
    "with a SAMGrad (perturbed, clean) pair at each leaf.",
  )


def perturbed_grads(grads: Any) -> Any:
  """The gradients at the perturbed weights, ``g'``, as a plain tree.

  This is what the optimizers after :func:`fsam_optax.fsam` receive (after
  :func:`fsam_optax.gsam`, the combined gradient it hands them). Use it
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
  pairs carry no clean gradient (nor do GSAM's, VaSSO's and LookSAM's, whose
  updates do not read it): ask for ``return_diagnostics=True`` for its norm.

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
      "method's update does not read it (plain SAM, fsam with sigma=0, gsam, "
      "vasso, looksam). Its norm is in the diagnostics: "
      "sam_value_and_grad(..., return_diagnostics=True)."
    )
  return jax.tree.unflatten(treedef, [p.clean for p in pairs])
