"""WSAM follows ``pytorch_optimizer.WSAM``, a published port of the official ``WeightedSAM`` class.

Needs ``torch`` and ``pytorch-optimizer``, which are not among the project's
dependencies: CI has neither, so this module is skipped there (install torch's
CPU build, then ``pip install pytorch-optimizer``, and run
``python -m pytest -q tests/test_wsam_torch.py``).

Both sides train ``reference.init_mlp(0)`` for ``STEPS`` float64 steps on the
same minibatches, with ``torch.optim.SGD(momentum, weight_decay)`` as the base
(``optax.add_decayed_weights`` then ``optax.sgd(momentum=...)``) and a cosine
learning rate, which the decoupled term reads from the base's param group and
the library from the same schedule. As for GSAM, the port's global gradient
norm is computed in float32 whatever the parameters' dtype; the main test
replaces that helper with the same sums in float64.

The port clips ``g'`` only, where the official class clips ``g`` too (after
making ``e``, in ``first_step``): with ``max_norm`` the library follows the
class (``tests/test_wsam.py``), and here it is driven with the class's rule
on ``g'`` alone to show that this is the one difference.
"""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

import fsam_optax
from tests import reference as ref
from tests.jax_mlp import max_rel_error, run_library
from tests.test_family_reference import LR, MOMENTUM, STEPS, TOL, WD

torch = pytest.importorskip("torch")
pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
from tests.test_family_torch import TorchMLP, cosine, float64_norms  # noqa: E402, F401 (a fixture)

CASES = [
  dict(gamma=0.9, decoupled=True, adaptive=False),
  dict(gamma=0.8, decoupled=True, adaptive=True),
  dict(gamma=0.7, decoupled=False, adaptive=False),
  dict(gamma=0.9, decoupled=False, adaptive=True),
]
RHO = 0.2


def run_port(gamma, decoupled, adaptive, data, max_norm=None, foreach=False):
  model = TorchMLP(ref.init_mlp(0))
  opt = pytorch_optimizer.WSAM(
    model,
    model.parameters(),
    torch.optim.SGD,
    rho=RHO,
    gamma=gamma,
    adaptive=adaptive,
    decouple=decoupled,
    max_norm=max_norm,
    foreach=foreach,
    lr=LR,
    momentum=MOMENTUM,
    weight_decay=WD,
  )
  schedule = torch.optim.lr_scheduler.LambdaLR(opt.base_optimizer, cosine)
  path = []
  for x, y in data:
    x, y = torch.from_numpy(x), torch.from_numpy(y)

    def closure(x=x, y=y):
      loss = torch.nn.functional.mse_loss(model(x), y)
      loss.backward()
      return loss

    opt.step(closure)
    opt.zero_grad()
    schedule.step()
    path.append({k: v.detach().numpy().copy() for k, v in model.p.items()})
  assert path[-1]["w0"].dtype == np.float64
  return path


def run_fsam_optax(gamma, decoupled, adaptive, data):
  lr = optax.cosine_decay_schedule(LR, STEPS)
  method = fsam_optax.wsam(
    RHO, gamma, adaptive=adaptive, decoupled=decoupled, learning_rate=lr if decoupled else None
  )
  tx = fsam_optax.chain(method, optax.add_decayed_weights(WD), optax.sgd(lr, momentum=MOMENTUM))
  with jax.enable_x64(True):
    path, _ = run_library(tx, data)
    return [{k: np.asarray(v) for k, v in params.items()} for params in path]


@pytest.mark.usefixtures("float64_norms")
@pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_wsam_follows_the_port(case, foreach):
  data = ref.batches(seed=1, steps=STEPS)
  assert (
    max_rel_error(run_port(**case, data=data, foreach=foreach), run_fsam_optax(**case, data=data))
    < TOL
  )


@pytest.mark.parametrize("case", CASES, ids=str)
def test_wsam_follows_the_port_to_float32_norms(case):
  data = ref.batches(seed=1, steps=STEPS)
  assert max_rel_error(run_port(**case, data=data), run_fsam_optax(**case, data=data)) < 1e-6


@pytest.mark.usefixtures("float64_norms")
def test_the_ports_clipping_is_the_class_rule_on_the_perturbed_gradient_only():
  """With max_norm the port equals the NumPy statement of the class with g left unclipped."""
  data = ref.batches(seed=1, steps=STEPS)
  case = dict(gamma=0.9, decoupled=True, adaptive=False)
  port = run_port(**case, data=data, max_norm=0.05)
  lr = lambda t: LR * cosine(t)

  class PerturbedOnly(ref.WSAMReference):
    def gradient(self, theta, grad_at, sam_step=True):
      g = grad_at(theta)
      e = ref.sam_perturbation(theta, g, self.rho, self.eps)
      gp = self.clip(grad_at(ref.shift(theta, e)))
      alpha = self.gamma / (1 - self.gamma)
      self.term = {k: -self.lr * alpha * (gp[k] - g[k]) for k in g}
      return g

  want = ref.train_family(
    PerturbedOnly(RHO, 0.9, max_norm=0.05),
    ref.SGDReference(LR, MOMENTUM, WD),
    ref.init_mlp(0),
    data,
    lr_at=lr,
  )
  assert max_rel_error(port, want) < TOL
  with jax.enable_x64(True):
    tx = fsam_optax.chain(
      fsam_optax.wsam(
        RHO, 0.9, learning_rate=optax.cosine_decay_schedule(LR, STEPS), max_norm=0.05
      ),
      optax.add_decayed_weights(WD),
      optax.sgd(optax.cosine_decay_schedule(LR, STEPS), momentum=MOMENTUM),
    )
    library, _ = run_library(tx, data)
  assert max_rel_error(library, port) > 1e-3  # the class's clipping of g, which the port skips
