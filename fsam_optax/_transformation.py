"""A SAM-family method as an Optax transformation, built around its state type.

Every method's ``init`` fills the same fields (the count, ``rho`` at count 0,
``eps``, its scalars, its buffer, the static config), and every method's
``update`` hands the base optimizer the ``grad`` of each :class:`SAMGrad`,
stores the ``buffer`` in the state, and advances the count and ``rho``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fsam_optax._buffers import zeros_buffer
from fsam_optax._config import PerturbationConfig
from fsam_optax._hyperparams import at, check, default_float
from fsam_optax._mask import Mask, check_mask_leaves, resolve_mask
from fsam_optax._method import register
from fsam_optax._pairs import split_grads
from fsam_optax._schedule import check_schedule


def method_transformation(
  state_type: type,
  name: str,
  *,
  rho: optax.ScalarOrSchedule,
  eps: float | jax.Array,
  scalars: Mapping[str, optax.ScalarOrSchedule] | None = None,
  options: Mapping[str, Hashable] | None = None,
  buffer: str | None = None,
  buffer_dtype: Any | None = None,
  adaptive: bool = False,
  mask: Mask | None = None,
  every: int | None = None,
  probability: float | None = None,
  seed: int | None = None,
  skip_nonfinite: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """The Optax transformation of a SAM-family method whose state is ``state_type``.

  It goes first in a chain and is fed by :func:`fsam_optax.sam_value_and_grad`,
  which reads ``state_type``'s :meth:`~fsam_optax.SAMState.direction` and
  :meth:`~fsam_optax.SAMState.combine`; its update hands the base optimizer
  the gradients those return, stores their buffer, and advances the count
  and ``rho``. Everything the helper offers (every layout, micro-batches,
  loss scaling, ``inject_hyperparams``, schedules, checkpoints) then works
  for the method.

  Args:
    state_type: a ``NamedTuple`` with the fields ``count``, ``rho``, ``eps``,
      ``config``, one for each of ``scalars`` and one named ``buffer``, and
      the methods of :class:`fsam_optax.SAMState`.
    name: the method's name, in error messages and the state's config.
    rho: perturbation radius, ``>= 0``; a scalar or a schedule of the step.
    eps: added to the norm before dividing, ``> 0``.
    scalars: the method's other hyperparameters, by field name: numbers,
      scalar arrays or schedules of the count, stored at every update as
      ``rho`` is (a schedule evaluated at the count of the update the state
      serves; ``inject_hyperparams`` can change them); the rules read them
      with ``step.hyperparam(name)``. A field the method leaves out of
      ``scalars`` keeps its default.
    options: the method's static settings, by name: hashable Python values
      fixed when it is built, which choose what its rules compute (they read
      them with ``self.config.option(name)``).
    buffer: the field of the state that holds the method's parameter-shaped
      buffer (zeros at ``init``; replaced by the ``buffer`` of each
      :class:`fsam_optax.SAMGrad` at each update), or ``None``.
    buffer_dtype: its dtype; by default float32 for parameters narrower than
      float32, the parameter's dtype otherwise.
    adaptive: the PyTorch SAM code's adaptive perturbation, ``e = rho theta^2 d /
      (||theta d|| + eps)`` (ASAM's authors weight by ``|theta| + eta`` instead).
    mask: a pytree of bools (or a callable of the params returning one); leaves
      that are ``False`` are not perturbed and are left out of every norm.
    every: take the two-pass step on steps ``0, every, 2 every, ...`` only.
    probability: take it with this probability, drawn from ``seed`` and the count.
    seed: seed of the ``probability`` draws.
    skip_nonfinite: leave the state unchanged on a step whose gradients are
      not all finite (for ``optax.apply_if_finite`` after the method).

  Returns:
    A :class:`optax.GradientTransformationExtraArgs`.

  Example:
    A method that perturbs along the sign of the gradient:

    >>> from typing import NamedTuple
    >>> import jax, jax.numpy as jnp, optax, fsam_optax
    >>> class SignState(NamedTuple):
    ...   count: jax.Array
    ...   rho: jax.Array
    ...   eps: jax.Array
    ...   config: fsam_optax.PerturbationConfig
    ...   def direction(self, grads, step):
    ...     return [jnp.sign(g) for g in grads]
    >>> def sign_sam(rho=0.05):
    ...   return fsam_optax.method_transformation(SignState, "sign_sam", rho=rho, eps=1e-12)
    >>> params = jnp.array([3.0, -4.0])
    >>> tx = optax.chain(sign_sam(rho=1.0), optax.sgd(0.1))
    >>> grad_fn = fsam_optax.sam_value_and_grad(lambda p: jnp.sum(p ** 2) / 2)
    >>> _, grads = grad_fn(params, tx.init(params))
    >>> print(fsam_optax.base_grads(grads))
    [ 3.7071068 -4.7071066]
  """
  scalars = dict(scalars or {})
  _check_builder(state_type, name, scalars, buffer, buffer_dtype, adaptive, skip_nonfinite)
  given = list(dict(options or {}).items())
  _check_options(name, given)
  static = tuple(sorted(given))
  register(state_type, name, [*scalars, *([buffer] if buffer else [])])
  check(name, "rho", rho, lambda v: v >= 0, "a radius >= 0", schedule=True)
  check(name, "eps", eps, lambda v: v > 0, "> 0")
  for key, value in scalars.items():
    check(name, key, value, lambda v: v == v and abs(v) != float("inf"), "finite", schedule=True)
  if mask is not None and not callable(mask):
    check_mask_leaves(jax.tree.leaves(mask), name)
  schedule = check_schedule(every, probability, seed, name)
  if buffer_dtype is not None:
    buffer_dtype = jnp.dtype(buffer_dtype)

  def init_fn(params: optax.Params) -> Any:
    config = PerturbationConfig(
      adaptive=bool(adaptive),
      mask=resolve_mask(mask, params, name),
      skip_nonfinite=bool(skip_nonfinite),
      every=schedule[0],
      probability=schedule[1],
      seed=schedule[2],
      method=name,
      buffer=buffer,
      options=static,
    )
    zero = jnp.zeros([], jnp.int32)
    fields = {key: at(value, zero) for key, value in scalars.items()}
    if buffer is not None:
      fields[buffer] = zeros_buffer(params, buffer_dtype)
    return state_type(
      count=zero, rho=at(rho, zero), eps=default_float(eps), config=config, **fields
    )

  def update_fn(
    updates: optax.Updates, state: Any, params: optax.Params | None = None, **extra_args: Any
  ) -> tuple[optax.Updates, Any]:
    del params, extra_args
    grads, buffers, treedef = split_grads(updates, name)
    stored = {}
    if buffer is not None:
      old, buffer_def = jax.tree.flatten(getattr(state, buffer))
      if any(b is None for b in buffers):
        raise ValueError(
          f"{name}: these gradients carry no `{buffer}` for the state; compute them "
          "with sam_value_and_grad from the same opt_state you pass to tx.update."
        )
      if len(buffers) != len(old):
        raise ValueError(
          f"{name}: the gradients have {len(buffers)} leaves but the state's `{buffer}` "
          f"has {len(old)}; initialise the optimizer with the params you differentiate."
        )
      stored[buffer] = jax.tree.unflatten(buffer_def, buffers)

    def advance() -> Any:
      count = optax.safe_increment(state.count)
      again = {key: at(value, count) for key, value in scalars.items()}
      return state._replace(
        count=count, rho=at(rho, count), eps=default_float(eps), **again, **stored
      )

    kept = [*grads, *(b for b in buffers if b is not None)]
    new_state = advance_if_finite(skip_nonfinite, advance, state, kept)
    return jax.tree.unflatten(treedef, grads), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_builder(
  state_type: type,
  name: Any,
  scalars: Mapping[str, Any],
  buffer: str | None,
  buffer_dtype: Any,
  adaptive: Any,
  skip_nonfinite: Any,
) -> None:
  """The arguments of :func:`method_transformation` that no method may get wrong."""
  if not isinstance(name, str) or not name.isidentifier():
    raise ValueError(f"method_transformation: `name` must be an identifier string, got {name!r}.")
  taken = {"count", "rho", "eps", "config"}
  clash = sorted(taken & {*scalars, *([buffer] if buffer else [])})
  if clash or (buffer is not None and buffer in scalars):
    raise ValueError(
      f"{name}: the scalars and the buffer need fields of their own, besides `count`, "
      f"`rho`, `eps` and `config` and each other; got {clash or [buffer]}."
    )
  for option, value in (("adaptive", adaptive), ("skip_nonfinite", skip_nonfinite)):
    if not isinstance(value, bool):
      raise ValueError(f"{name}: `{option}` must be a Python bool, got {value!r}.")
  if buffer_dtype is not None and not jnp.issubdtype(jnp.dtype(buffer_dtype), jnp.floating):
    raise ValueError(
      f"{name}: the buffer's dtype must be floating point, got {jnp.dtype(buffer_dtype)}."
    )
  if buffer is not None and not callable(getattr(state_type, "combine", None)):
    raise TypeError(
      f"{name}: the state type {getattr(state_type, '__name__', state_type)} keeps a buffer "
      f"(`{buffer}`) but has no `combine(self, perturbed, clean, step)` to say its new value."
    )


def _check_options(name: str, options: Sequence[tuple[Any, Any]]) -> None:
  """A ValueError unless every static option is named by a string and hashable."""
  for key, value in options:
    if not isinstance(key, str) or not key.isidentifier():
      raise ValueError(f"{name}: static options are named by identifier strings, got {key!r}.")
    try:
      hash(value)
    except TypeError:
      raise ValueError(
        f"{name}: the static option `{key}` must be hashable (a bool, number, string or "
        f"None), got {type(value).__name__}."
      ) from None


def advance_if_finite(
  skip_nonfinite: bool, advance: Callable[[], Any], state: Any, grads: Sequence[jax.Array]
) -> Any:
  """``advance()``, or with ``skip_nonfinite`` ``state`` unchanged where a gradient is not finite.

  A non-finite step must not reach a moving average (it would never leave it).
  """
  if not skip_nonfinite:
    return advance()
  finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(g)) for g in grads] or [True]))
  # lax.cond, not a select per leaf: the selects make XLA's compile time
  # grow steeply with the number of leaves.
  return jax.lax.cond(finite, advance, lambda: state)
