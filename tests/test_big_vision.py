"""GSAM's big_vision forms follow big_vision's own ``gsam_gradient`` and trainer, where present.

big_vision is not on PyPI and CI does not have it: this module is skipped unless
``BIG_VISION_DIR`` names a checkout of google-research/big_vision. Run it with
``BIG_VISION_DIR=path/to/big_vision python -m pytest -q tests/test_big_vision.py``.

Its ``trainers/proj/gsam/gsam.py`` is loaded as it is (with ``jax.tree_map``,
which newer JAX removed, pointed at ``jax.tree.map``) and driven as its trainer
does: per worker under ``pmap``, then ``pmean``, then the optimizer of
``big_vision.optax.make`` for a GSAM config (clipping, Adam, the learning rate,
decoupled weight decay on the kernels, the schedule), numbering its steps from
1 while the optimizer counts from 0. The library runs the port the GSAM guide
gives: the same chain behind ``fsam_optax.gsam``, with the radius read one step
ahead. 20 float64 steps of the MLP on one device and on 8 CPU devices, every form.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fsam_optax
from tests import reference as ref
from tests.jax_mlp import max_rel_error, mlp_loss
from tests.train_step import per_worker_step, replicate

ROOT = os.environ.get("BIG_VISION_DIR")
if not ROOT:
  pytest.skip("BIG_VISION_DIR is not set", allow_module_level=True)
GSAM_PY = pathlib.Path(ROOT) / "big_vision" / "trainers" / "proj" / "gsam" / "gsam.py"

STEPS, WARMUP = 20, 4
LR, LINEAR_END, WD, CLIP = 0.003, 0.01, 0.001, 1.0
GSAM = dict(rho_max=0.6, rho_min=0.1, alpha=0.6, lr_max=LR, lr_min=LINEAR_END * LR)
FORMS = [
  dict(minimize_fp=True, adaptive_perturbation=False),
  dict(minimize_fp=True, adaptive_perturbation=True),
  dict(minimize_fp=False, adaptive_perturbation=False),
  dict(minimize_fp=False, adaptive_perturbation=True),
]


def load_gsam_gradient(monkeypatch):
  monkeypatch.setattr(jax, "tree_map", jax.tree.map, raising=False)  # removed from newer JAX
  spec = importlib.util.spec_from_file_location("big_vision_gsam", GSAM_PY)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.gsam_gradient


def multiplier(step):
  """big_vision's linear schedule with warmup (``create_learning_rate_schedule``), in float64."""
  progress = jnp.clip((step - WARMUP) / (STEPS - WARMUP), 0.0, 1.0)
  decayed = LINEAR_END + (1.0 - LINEAR_END) * (1.0 - progress)
  return decayed * jnp.minimum(1.0, step / WARMUP)


def base_optimizer():
  """``big_vision.optax.make`` for this config: its chain, term for term."""
  kernels = {"w0": True, "b0": False, "w1": True, "b1": False}
  return [
    optax.clip_by_global_norm(CLIP),
    optax.scale_by_adam(),
    optax.scale(LR),
    optax.add_decayed_weights(WD, kernels),
    optax.scale_by_schedule(multiplier),
    optax.scale(-1.0),
  ]


def big_vision_run(form, data, n, monkeypatch):
  gsam_gradient = load_gsam_gradient(monkeypatch)
  tx = optax.chain(*base_optimizer())
  loss = lambda p, x, y: mlp_loss(p, x, y)

  @functools.partial(jax.pmap, axis_name="batch")
  def update(params, opt, x, y, step):
    lr = multiplier(step) * LR
    _, grads = gsam_gradient(loss, params, x, y, lr=lr, **GSAM, **form)
    grads = jax.lax.pmean(grads, axis_name="batch")
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt

  params = jax.tree.map(jnp.asarray, ref.init_mlp(0))
  params, opt = replicate(params, n), replicate(tx.init(params), n)
  path = []
  for step, (x, y) in enumerate(data, start=1):  # the trainer numbers steps from 1
    params, opt = update(params, opt, *split(x, y, n), jnp.full(n, step))
    path.append(jax.tree.map(lambda a: np.asarray(a[0]), params))
  return path


def library_run(form, data, n):
  lr = lambda count: LR * multiplier(count)
  rho = fsam_optax.gsam_rho_schedule(
    lambda count: lr(count + 1),  # one step ahead, as the trainer
    lr_max=GSAM["lr_max"],
    lr_min=GSAM["lr_min"],
    rho_max=GSAM["rho_max"],
    rho_min=GSAM["rho_min"],
  )
  method = fsam_optax.gsam(
    rho,
    GSAM["alpha"],
    minimize="perturbed" if form["minimize_fp"] else "clean",
    relative=form["adaptive_perturbation"],
  )
  tx = optax.chain(method, *base_optimizer())
  step = per_worker_step(tx, mlp_loss, "batch")
  params = jax.tree.map(jnp.asarray, ref.init_mlp(0))
  params, opt_state = replicate(params, n), replicate(tx.init(params), n)
  path = []
  for x, y in data:
    params, opt_state = step(params, opt_state, *split(x, y, n))
    path.append(jax.tree.map(lambda a: np.asarray(a[0]), params))
  return path


def split(x, y, n):
  return x.reshape(n, -1, x.shape[-1]), y.reshape(n, -1, y.shape[-1])


@pytest.mark.parametrize("devices", ["one", "all"])
@pytest.mark.parametrize("form", FORMS, ids=str)
def test_the_port_follows_big_vision(form, devices, monkeypatch):
  n = 1 if devices == "one" else jax.device_count()
  with jax.enable_x64(True):
    data = ref.batches(seed=5, steps=STEPS, batch=4 * n)
    want = big_vision_run(form, data, n, monkeypatch)
    got = library_run(form, data, n)
    error = max_rel_error(got, want)
    print(f"{form}: {error:.1e}")
    assert error < 1e-9
