"""What adopting F-SAM costs a user's code: the lines of a train step, plain SGD vs F-SAM.

For NNX, Equinox and Linen, the loss and the step function are written as each
framework's own examples write them, once with plain gradients and once with
``fsam_optax.sam_value_and_grad``. Each version is run for a few steps (so the
snippets cannot drift from the library), and its lines are counted without
imports, blank lines and comments. Building the optimizer (``tx``) is left out:
it is one line either way.

  python benchmarks/step_lines.py
"""

from __future__ import annotations

import textwrap

import jax
import jax.numpy as jnp
import optax

import fsam_optax

STEPS = {
  "nnx": (
    """
    def loss_fn(model, x, y):
      return jnp.mean((model(x) - y) ** 2)

    @nnx.jit
    def train_step(model, optimizer, x, y):
      loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
      optimizer.update(model, grads)
      return loss
    """,
    """
    def loss_fn(model, x, y):
      return jnp.mean((model(x) - y) ** 2)

    grad_fn = fsam_optax.sam_value_and_grad(loss_fn)

    @nnx.jit
    def train_step(model, optimizer, x, y):
      loss, grads = grad_fn(model, optimizer, x, y)
      optimizer.update(model, grads)
      return loss
    """,
  ),
  "equinox": (
    """
    def loss_fn(model, x, y):
      return jnp.mean((jax.vmap(model)(x) - y) ** 2)

    @eqx.filter_jit
    def train_step(model, opt_state, x, y):
      loss, grads = eqx.filter_value_and_grad(loss_fn)(model, x, y)
      updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_array))
      return eqx.apply_updates(model, updates), opt_state, loss
    """,
    """
    def loss_fn(model, x, y):
      return jnp.mean((jax.vmap(model)(x) - y) ** 2)

    grad_fn = fsam_optax.sam_value_and_grad(loss_fn)

    @eqx.filter_jit
    def train_step(model, opt_state, x, y):
      loss, grads = grad_fn(model, opt_state, x, y)
      updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_array))
      return eqx.apply_updates(model, updates), opt_state, loss
    """,
  ),
  "linen": (
    """
    def loss_fn(params, x, y, key):
      out = Net().apply({"params": params}, x, rngs={"dropout": key})
      return jnp.mean((out - y) ** 2)

    @jax.jit
    def train_step(state, x, y, key):
      key = jax.random.fold_in(key, state.step)
      loss, grads = jax.value_and_grad(loss_fn)(state.params, x, y, key)
      return state.apply_gradients(grads=grads), loss
    """,
    """
    def loss_fn(params, x, y, key):
      out = Net().apply({"params": params}, x, rngs={"dropout": key})
      return jnp.mean((out - y) ** 2)

    grad_fn = fsam_optax.sam_value_and_grad(loss_fn, rng_arg="key")

    @jax.jit
    def train_step(state, x, y, key):
      key = jax.random.fold_in(key, state.step)
      loss, grads = grad_fn(state.params, state.opt_state, x, y, key)
      return state.apply_gradients(grads=grads), loss
    """,
  ),
}


def count_lines(code: str) -> int:
  """Lines that are not blank, not comments and not imports."""
  lines = [line.strip() for line in code.splitlines()]
  return sum(1 for line in lines if line and not line.startswith(("#", "import ", "from ")))


def run(framework: str, code: str, tx: optax.GradientTransformation) -> float:
  """Defines the snippet's step and takes three steps with it; the last loss."""
  x = jax.random.normal(jax.random.key(0), (16, 4))
  y = jnp.sum(x, axis=1, keepdims=True)
  scope = dict(jax=jax, jnp=jnp, optax=optax, fsam_optax=fsam_optax, tx=tx)
  if framework == "nnx":
    from flax import nnx

    scope["nnx"] = nnx
    exec(textwrap.dedent(code), scope)
    model = nnx.Linear(4, 1, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    losses = [scope["train_step"](model, optimizer, x, y) for _ in range(3)]
  elif framework == "equinox":
    import equinox as eqx

    scope["eqx"] = eqx
    exec(textwrap.dedent(code), scope)
    model = eqx.nn.MLP(4, 1, width_size=8, depth=1, key=jax.random.key(1))
    opt_state = tx.init(eqx.filter(model, eqx.is_array))
    losses = []
    for _ in range(3):
      model, opt_state, loss = scope["train_step"](model, opt_state, x, y)
      losses.append(loss)
  else:
    import flax.linen as nn
    from flax.training import train_state

    class Net(nn.Module):
      @nn.compact
      def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(1)(nn.Dropout(0.1, deterministic=False)(nn.relu(nn.Dense(8)(x))))

    scope["Net"] = Net
    exec(textwrap.dedent(code), scope)
    params = Net().init({"params": jax.random.key(1), "dropout": jax.random.key(2)}, x)
    state = train_state.TrainState.create(apply_fn=Net().apply, params=params["params"], tx=tx)
    losses = []
    for _ in range(3):
      state, loss = scope["train_step"](state, x, y, jax.random.key(3))
      losses.append(loss)
  return float(losses[-1])


def main() -> None:
  print(f"{'framework':<10} {'SGD':>4} {'F-SAM':>6} {'more':>5}")
  for framework, (sgd, fsam) in STEPS.items():
    run(framework, sgd, optax.sgd(0.05))
    run(framework, fsam, optax.chain(fsam_optax.fsam(rho=0.2), optax.sgd(0.05)))
    n_sgd, n_fsam = count_lines(sgd), count_lines(fsam)
    print(f"{framework:<10} {n_sgd:>4} {n_fsam:>6} {n_fsam - n_sgd:>+5}")


if __name__ == "__main__":
  main()
