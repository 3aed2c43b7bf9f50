"""Low precision: the moving average's dtype, the perturbation that survives rounding,
and loss scaling for float16."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import fsam_optax
from tests.train_step import sam_step


def ema_after(params, grads_per_step, **kwargs):
  """F-SAM's moving average after steps whose clean gradients are ``grads_per_step``."""
  tx = fsam_optax.fsam(**kwargs)
  # A linear loss: its gradient is g, at theta and at theta + e alike.
  linear = lambda p, g: sum(
    jnp.sum(x * y) for x, y in zip(jax.tree.leaves(p), jax.tree.leaves(g), strict=True)
  )
  grad_fn = fsam_optax.sam_value_and_grad(linear)
  step = jax.jit(lambda state, g: tx.update(grad_fn(params, state, g)[1], state)[1])
  state = tx.init(params)
  for g in grads_per_step:
    state = step(state, g)
  return state.ema


def test_bfloat16_moving_average_over_300_steps_is_within_1_percent_of_float64():
  rng = np.random.default_rng(0)
  mean = rng.normal(size=(64, 32))
  # bfloat16 gradients: a shared part plus noise, as minibatch gradients are.
  grads = [
    {"w": jnp.asarray(mean + 0.3 * rng.normal(size=mean.shape), jnp.bfloat16)} for _ in range(300)
  ]
  m = np.asarray(grads[0]["w"], np.float64)  # m_1 = g_1, then m = l m + (1 - l) g
  for g in grads[1:]:
    m = 0.99 * m + 0.01 * np.asarray(g["w"], np.float64)
  params = {"w": jnp.zeros(mean.shape, jnp.bfloat16)}
  rel = lambda ema: np.linalg.norm(np.asarray(ema["w"], np.float64) - m) / np.linalg.norm(m)

  ema = ema_after(params, grads, lmbda=0.99)
  assert ema["w"].dtype == jnp.float32
  assert rel(ema) < 0.01, rel(ema)
  # Kept in bfloat16 (the old behaviour, still available), the increments round away.
  ema = ema_after(params, grads, lmbda=0.99, ema_dtype=jnp.bfloat16)
  assert ema["w"].dtype == jnp.bfloat16
  assert rel(ema) > 0.02, rel(ema)


@pytest.mark.parametrize(
  ("param_dtype", "ema_dtype", "expected"),
  [
    (jnp.bfloat16, None, jnp.float32),
    (jnp.float16, None, jnp.float32),
    (jnp.float32, None, jnp.float32),
    (jnp.float32, jnp.bfloat16, jnp.bfloat16),
    (jnp.bfloat16, jnp.float32, jnp.float32),
  ],
)
def test_moving_average_dtype_per_leaf(param_dtype, ema_dtype, expected):
  params = {"a": jnp.zeros(3, param_dtype), "b": jnp.zeros(2, jnp.float32)}
  ema = fsam_optax.fsam(ema_dtype=ema_dtype).init(params).ema
  assert ema["a"].dtype == expected
  assert ema["b"].dtype == (ema_dtype or jnp.float32)


def test_float64_params_keep_a_float64_average():
  with jax.enable_x64(True):
    ema = fsam_optax.fsam().init({"w": jnp.zeros(2, jnp.float64)}).ema
    assert ema["w"].dtype == jnp.float64


NP_DTYPE = {jnp.float32: np.float32, jnp.bfloat16: ml_dtypes.bfloat16}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_applied_perturbation_norm_is_what_survives_rounding(dtype, size=100_000, rho=0.05):
  rng = np.random.default_rng(1)
  theta, g = rng.normal(size=size), rng.normal(size=size)
  params = {"w": jnp.asarray(theta, dtype)}
  loss = lambda p: jnp.sum(p["w"].astype(jnp.float32) * jnp.asarray(g, jnp.float32))
  grad_fn = jax.jit(fsam_optax.sam_value_and_grad(loss, return_diagnostics=True))
  _, _, diag = grad_fn(params, fsam_optax.sam(rho).init(params))
  # Independently, in NumPy: e = rho g / ||g||, theta + e stored in the params' dtype.
  as_dtype = lambda x: np.asarray(x).astype(NP_DTYPE[dtype])
  theta = as_dtype(theta)
  stored = (theta + as_dtype(rho * g / np.linalg.norm(g))).astype(NP_DTYPE[dtype])
  expected = np.linalg.norm(stored.astype(np.float64) - theta.astype(np.float64))
  assert float(diag.perturbation_norm) == pytest.approx(rho, rel=1e-3)  # of e as rounded
  assert float(diag.applied_perturbation_norm) == pytest.approx(expected, rel=1e-3)
  if dtype == jnp.float32:
    assert float(diag.applied_perturbation_norm) == pytest.approx(rho, rel=1e-3)
  else:  # each |e_i| ~ 1.6e-4 is below half the bfloat16 spacing near |theta| ~ 1
    assert float(diag.applied_perturbation_norm) < 0.4 * rho


# float16 loss scaling. The loss is tiny (2**-20 times a mean square), so in
# float16 its gradients flush to zero unless the loss is scaled up first.
SCALES = [2.0**15, 2.0**13, 2.0**40, 2.0**14, 2.0**12, 2.0**15]  # 2**40 overflows float16
BAD = 2


def small_loss(params, x, y, dtype):
  w, b = params["w"].astype(dtype), params["b"].astype(dtype)
  residual = x.astype(dtype) @ w + b - y.astype(dtype)
  return jnp.mean(residual**2) * jnp.asarray(2.0**-20, dtype)


def scaled_run(dtype, scales):
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  params = {"w": jax.random.normal(k1, (8, 4)) / 3, "b": jnp.zeros((1, 4))}
  target = jax.random.normal(k2, (8, 4))
  # SGD with a rate that makes the 2**-20 loss move the weights visibly.
  tx = optax.chain(
    fsam_optax.fsam(rho=0.05, sigma=1.0, lmbda=0.6, skip_nonfinite=True),
    optax.apply_if_finite(optax.sgd(2.0**17), 3),
  )
  loss = lambda p, x, y: small_loss(p, x, y, dtype)
  step = sam_step(tx, loss, outputs=("diag",), return_diagnostics=True)

  state, out = tx.init(params), []
  for i, scale in enumerate(scales):
    x = jax.random.normal(jax.random.fold_in(k3, i), (64, 8))
    scale = None if scale is None else jnp.float32(scale)
    params, state, diag = step(params, state, x, x @ target, loss_scale=scale)
    out.append((params, state, diag))
  return out, step


def test_float16_with_a_changing_loss_scale_matches_float32_and_skips_the_overflow():
  f16, step = scaled_run(jnp.float16, SCALES)
  assert step._cache_size() == 1  # the scale is traced: no recompile when it changes
  # The float32 run sees the same batches, without scaling, skipping the bad one.
  f32, _ = scaled_run(jnp.float32, [1.0 if i != BAD else jnp.nan for i in range(len(SCALES))])
  for i, ((p16, s16, d16), (p32, s32, d32)) in enumerate(zip(f16, f32, strict=True)):
    if i == BAD:  # overflow: nothing moved, fsam's state included
      assert not np.isfinite(float(d16.clean_grad_norm))
      assert int(s16[0].count) == BAD and int(s16[1].total_notfinite) == 1
    else:
      np.testing.assert_allclose(float(d16.direction_norm), float(d32.direction_norm), rtol=1e-2)
    for a, b in zip(
      jax.tree.leaves((p16, s16[0].ema)), jax.tree.leaves((p32, s32[0].ema)), strict=True
    ):
      np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-3 * float(jnp.max(jnp.abs(b))))


def test_without_a_loss_scale_the_float16_gradients_flush_to_zero():
  (_, _, diag), *_ = scaled_run(jnp.float16, [None])[0]
  assert float(diag.clean_grad_norm) == 0.0
