"""A plain NumPy, float64 statement of the official F-SAM code, a small network, and
the algorithm driven on the separable quadratic loss of ``tests.jax_mlp.quadratic_loss``.

Nothing here imports fsam_optax: it is the independent reference the library
is checked against.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

EPS = 1e-12


@dataclasses.dataclass
class FSAMReference:
  """One F-SAM optimiser as the official code runs it, on dicts of arrays.

  ``ema_feed`` and ``form`` exist only to build the variants that the tests
  must tell apart from the official code: ``ema_feed="d"`` is an EMA of the
  corrected direction (a variant found in some PyTorch ports), ``form="paper"`` is the
  paper's written form (m_0 = 0, EMA updated first, d uses the new m).
  """

  rho: float
  sigma: float
  lmbda: float
  adaptive: bool = False
  ema_feed: str = "g"
  form: str = "official"
  m: dict | None = None

  def direction(self, g: dict) -> dict:
    """Returns d and updates the EMA, as step 2 of the algorithm says."""
    if self.form == "paper":
      m_old = self.m or {k: np.zeros_like(v) for k, v in g.items()}
      self.m = {k: self.lmbda * m_old[k] + (1 - self.lmbda) * g[k] for k in g}
      return {k: g[k] - self.sigma * self.m[k] for k in g}
    if self.m is None:
      self.m = dict(g)
      return dict(g)
    d = {k: g[k] - self.sigma * self.m[k] for k in g}
    feed = g if self.ema_feed == "g" else d
    self.m = {k: self.lmbda * self.m[k] + (1 - self.lmbda) * feed[k] for k in g}
    return d

  def gradient(self, theta: dict, grad_at: Callable[[dict], dict], sam_step: bool = True) -> dict:
    """g' at theta + e, the moving average advanced: as the family's references take it.

    On a one-pass step (``sam_step=False``) the average is fed g and g is handed on.
    """
    g = grad_at(theta)
    d = self.direction(g)
    return grad_at(shift(theta, self.perturbation(theta, d))) if sam_step else g

  def perturbation(self, theta: dict, d: dict) -> dict:
    """Steps 3 and 4: e = rho d / (||d|| + eps), or the adaptive form."""
    scaled = {k: np.abs(theta[k]) * d[k] if self.adaptive else d[k] for k in d}
    n = np.sqrt(sum(np.sum(v**2) for v in scaled.values()))
    return {k: self.rho * (theta[k] ** 2 if self.adaptive else 1.0) * d[k] / (n + EPS) for k in d}


@dataclasses.dataclass
class SGDReference:
  """optax.add_decayed_weights then optax.sgd with (heavy-ball) momentum."""

  lr: float
  momentum: float
  weight_decay: float
  trace: dict | None = None

  def step(self, theta: dict, grads: dict) -> dict:
    u = {k: grads[k] + self.weight_decay * theta[k] for k in grads}
    if self.trace is None:
      self.trace = {k: np.zeros_like(v) for k, v in u.items()}
    self.trace = {k: u[k] + self.momentum * self.trace[k] for k in u}
    return {k: theta[k] - self.lr * self.trace[k] for k in theta}


@dataclasses.dataclass
class AdamReference:
  """optax.adamw (optax.adam at ``wd = 0``): bias-corrected moments, ``eps`` outside the
  square root, decoupled weight decay."""

  lr: float
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  wd: float = 0.0
  t: int = 0
  mu: dict | None = None
  nu: dict | None = None

  def step(self, theta: dict, grads: dict) -> dict:
    if self.mu is None:
      self.mu = {k: np.zeros_like(v) for k, v in grads.items()}
      self.nu = {k: np.zeros_like(v) for k, v in grads.items()}
    self.t += 1
    self.mu = {k: self.b1 * self.mu[k] + (1 - self.b1) * grads[k] for k in grads}
    self.nu = {k: self.b2 * self.nu[k] + (1 - self.b2) * grads[k] ** 2 for k in grads}
    out = {}
    for k in theta:
      mu_hat = self.mu[k] / (1 - self.b1**self.t)
      nu_hat = self.nu[k] / (1 - self.b2**self.t)
      out[k] = theta[k] - self.lr * (mu_hat / (np.sqrt(nu_hat) + self.eps) + self.wd * theta[k])
    return out


def init_mlp(seed: int, sizes: tuple[int, ...] = (5, 7, 3)) -> dict:
  """A tanh MLP's weights, as float64 NumPy arrays."""
  rng = np.random.default_rng(seed)
  params = {}
  for i, (a, b) in enumerate(itertools.pairwise(sizes)):
    params[f"w{i}"] = rng.normal(size=(a, b)) / np.sqrt(a)
    params[f"b{i}"] = rng.normal(size=(b,)) * 0.1
  return params


def mlp_loss_and_grad(params: dict, x: np.ndarray, y: np.ndarray) -> tuple[float, dict]:
  """Mean squared error of a tanh MLP, with its gradient by hand (backprop)."""
  n_layers = len(params) // 2
  acts = [x]
  for i in range(n_layers):
    z = acts[-1] @ params[f"w{i}"] + params[f"b{i}"]
    acts.append(np.tanh(z) if i < n_layers - 1 else z)
  err = acts[-1] - y
  loss = float(np.mean(err**2))
  delta = 2 * err / err.size
  grads = {}
  for i in reversed(range(n_layers)):
    grads[f"w{i}"] = acts[i].T @ delta
    grads[f"b{i}"] = delta.sum(axis=0)
    if i:
      delta = (delta @ params[f"w{i}"].T) * (1 - acts[i] ** 2)
  return loss, grads


def batches(seed: int, steps: int, batch: int = 16, sizes=(5, 7, 3)) -> list[tuple]:
  """Fixed regression minibatches: a noisy linear target."""
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(sizes[0], sizes[-1]))
  out = []
  for _ in range(steps):
    x = rng.normal(size=(batch, sizes[0]))
    out.append((x, np.tanh(x @ w) + 0.1 * rng.normal(size=(batch, sizes[-1]))))
  return out


def train(opt: FSAMReference, base: SGDReference, theta: dict, data: list) -> list[dict]:
  """Runs steps 1-6 for every batch and returns the weights after each step."""
  path = []
  for x, y in data:
    _, g = mlp_loss_and_grad(theta, x, y)
    d = opt.direction(g)
    e = opt.perturbation(theta, d)
    _, g_p = mlp_loss_and_grad({k: theta[k] + e[k] for k in theta}, x, y)
    theta = base.step(theta, g_p)
    path.append(theta)
  return path


class Step(NamedTuple):
  """What one reference step produced (lists follow the params' leaf order)."""

  params: list[np.ndarray]
  ema: list[np.ndarray]
  clean: list[np.ndarray]
  perturbed: list[np.ndarray]
  direction_norm: float


def fsam_steps(
  params: Sequence[np.ndarray],
  a_per_step: Sequence[Sequence[np.ndarray]],
  c: Sequence[np.ndarray],
  *,
  rho: float,
  sigma: float,
  lmbda: float,
  lr: float,
  adaptive: bool = False,
  mask: Sequence[bool] | None = None,
  per_step: Sequence[dict[str, float]] | None = None,
  clip_clean: float | None = None,
  base: Callable[[dict, dict], dict] | None = None,
  take: Sequence[bool] | None = None,
) -> list[Step]:
  """Runs F-SAM then plain SGD(``lr``) on :func:`quadratic_loss`, in float64.

  The algorithm is :class:`FSAMReference` on the leaves keyed by
  position; a mask restricts the perturbation, and so its norm, to the chosen
  leaves, while the moving average still covers every leaf. ``per_step[i]``
  overrides hyperparameters (``rho``, ``sigma``, ``lmbda``) at step ``i``;
  ``clip_clean`` clips the clean gradient to that global norm before it forms
  the direction and feeds the average;
  ``base(theta, g_pert)`` replaces the SGD step (``lr`` is then unused).
  ``take[i] = False`` skips the SAM step at step ``i`` (a schedule's choice, which the
  tests observe from the library: this reference does not draw it): no
  perturbation (``g' = g``, direction norm 0), while the average is still fed ``g``.
  """
  as64 = lambda xs: dict(enumerate(np.asarray(x, np.float64) for x in xs))
  theta, c = as64(params), as64(c)
  kept = [k for k in theta if mask is None or mask[k]]
  opt = FSAMReference(rho=rho, sigma=sigma, lmbda=lmbda, adaptive=adaptive)
  steps = []
  for i, a in enumerate(map(as64, a_per_step)):
    for name, value in (per_step[i] if per_step is not None else {}).items():
      setattr(opt, name, value)
    g = {k: a[k] + c[k] * theta[k] for k in theta}
    if clip_clean is not None:
      g_norm = np.sqrt(sum(np.sum(v**2) for v in g.values()))
      g = {k: v * min(1.0, clip_clean / g_norm) for k, v in g.items()}
    d = opt.direction(g)  # advances the moving average on every step
    e = {k: np.zeros_like(v) for k, v in theta.items()}
    n = 0.0
    if take is None or take[i]:
      e.update(opt.perturbation({k: theta[k] for k in kept}, {k: d[k] for k in kept}))
      n = np.sqrt(sum(np.sum((np.abs(theta[k]) * d[k] if adaptive else d[k]) ** 2) for k in kept))
    g_pert = {k: a[k] + c[k] * (theta[k] + e[k]) for k in theta}
    if base is None:
      theta = {k: theta[k] - lr * g_pert[k] for k in theta}
    else:
      theta = base(theta, g_pert)
    steps.append(
      Step(*map(list, (theta.values(), opt.m.values(), g.values(), g_pert.values())), float(n))
    )
  return steps


# The SAM family beside F-SAM, each as its authors' code (or, for LookSAM, the
# paper's Algorithm 1) computes one step, on dicts of float64 arrays. Each
# returns the gradient its base optimizer receives; ``grad_at(theta)`` is the
# gradient on the step's minibatch. ``kept`` (all keys by default) restricts
# the perturbation, norms and inner products to the unmasked leaves.


def norm(t: dict, keys=None) -> float:
  return float(np.sqrt(sum(np.sum(t[k] ** 2) for k in (t if keys is None else keys))))


def inner(a: dict, b: dict, keys=None) -> float:
  return float(sum(np.sum(a[k] * b[k]) for k in (a if keys is None else keys)))


def sam_perturbation(theta: dict, d: dict, rho: float, eps: float, adaptive=False, kept=None):
  """``rho d / (||d|| + eps)`` (adaptive: ``rho theta^2 d / (||theta d|| + eps)``), kept leaves."""
  kept = list(theta) if kept is None else kept
  n = norm({k: np.abs(theta[k]) * d[k] if adaptive else d[k] for k in kept})
  e = {k: np.zeros_like(v) for k, v in theta.items()}
  for k in kept:
    e[k] = rho * (theta[k] ** 2 if adaptive else 1.0) * d[k] / (n + eps)
  return e


def shift(theta: dict, e: dict) -> dict:
  return {k: theta[k] + e[k] for k in theta}


@dataclasses.dataclass
class GSAMReference:
  """GSAM (official gsam.py): SAM's g', minus alpha times g's part orthogonal to g'."""

  rho: float
  alpha: float
  adaptive: bool = False
  eps: float = EPS
  kept: list | None = None

  def gradient(self, theta: dict, grad_at: Callable[[dict], dict], sam_step: bool = True) -> dict:
    g = grad_at(theta)
    if not sam_step:  # one pass: g itself
      return g
    e = sam_perturbation(theta, g, self.rho, self.eps, self.adaptive, self.kept)
    return self.decompose(g, grad_at(shift(theta, e)))

  def decompose(self, g: dict, gp: dict) -> dict:
    keys = list(g) if self.kept is None else self.kept
    n_g, n_gp = norm(g, keys), norm(gp, keys)
    cos = inner(g, gp, keys) / (n_gp * n_g + self.eps)
    out = dict(gp)
    for k in keys:
      vertical = g[k] - cos * n_g * gp[k] / (n_gp + self.eps)
      out[k] = gp[k] - self.alpha * vertical
    return out


@dataclasses.dataclass
class BigVisionGSAMReference:
  """GSAM as big_vision's gsam_gradient computes it on one worker (its trainer averages after).

  ``relative``: its adaptive_perturbation, ``rho |theta| g / (||g|| + eps)``;
  ``minimize_fp=False``: ``g + alpha h``, ``h`` the part of ``g'`` orthogonal to ``g``.
  """

  rho: float
  alpha: float
  minimize_fp: bool = True
  relative: bool = False
  eps: float = EPS

  def gradient(self, theta: dict, grad_at: Callable[[dict], dict], sam_step: bool = True) -> dict:
    g = grad_at(theta)
    n_g = norm(g)
    weight = {k: np.abs(theta[k]) if self.relative else 1.0 for k in theta}
    gp = grad_at({k: theta[k] + weight[k] * self.rho * g[k] / (n_g + self.eps) for k in theta})
    if self.minimize_fp:  # g' minus alpha times g's part orthogonal to g'
      u = {k: v / norm(gp) for k, v in gp.items()}
      along = inner(u, g)
      return {k: gp[k] - self.alpha * (g[k] - along * u[k]) for k in g}
    u = {k: v / n_g for k, v in g.items()}
    along = inner(u, gp)
    return {k: g[k] + self.alpha * (gp[k] - along * u[k]) for k in g}


@dataclasses.dataclass
class VaSSOReference:
  """VaSSO (official vasso.py): the moving average updated first, the perturbation along it."""

  rho: float
  theta: float
  eps: float = 1e-7
  kept: list | None = None
  m: dict | None = None

  def gradient(self, w: dict, grad_at: Callable[[dict], dict], sam_step: bool = True) -> dict:
    g = grad_at(w)
    if self.m is None:
      self.m = dict(g)
    else:
      self.m = {k: (1 - self.theta) * self.m[k] + self.theta * g[k] for k in g}
    if not sam_step:  # one pass: the average is fed g, and g handed on
      return g
    return grad_at(shift(w, sam_perturbation(w, self.m, self.rho, self.eps, kept=self.kept)))


@dataclasses.dataclass
class LookSAMReference:
  """LookSAM (Algorithm 1): SAM on steps 0, k, 2k, ..., its orthogonal part reused between."""

  rho: float
  k: int
  alpha: float
  eps: float = EPS
  kept: list | None = None
  t: int = 0
  g_v: dict | None = None

  def gradient(
    self, theta: dict, grad_at: Callable[[dict], dict], sam_step: bool | None = None
  ) -> dict:
    """Its own rule (steps 0, k, 2k, ...) unless ``sam_step`` says which step to take."""
    g = grad_at(theta)
    keys = list(g) if self.kept is None else self.kept
    sam_step = self.t % self.k == 0 if sam_step is None else sam_step
    self.t += 1
    if sam_step:
      gp = grad_at(shift(theta, sam_perturbation(theta, g, self.rho, self.eps, kept=keys)))
      scale = inner(g, gp, keys) / (norm(g, keys) ** 2 + self.eps)
      self.g_v = {k: gp[k] - scale * g[k] if k in keys else np.zeros_like(g[k]) for k in g}
      return gp
    if self.g_v is None:  # a one-pass step before any SAM step: g_v starts at zero
      self.g_v = {k: np.zeros_like(g[k]) for k in g}
    scale = self.alpha * norm(g, keys) / (norm(self.g_v, keys) + self.eps)
    return {k: g[k] + scale * self.g_v[k] if k in keys else g[k] for k in g}


@dataclasses.dataclass
class WSAMReference:
  """WSAM (the official WeightedSAM class): ``g`` and ``g'`` weighted, or decoupled.

  Decoupled, the base optimizer receives ``g`` and ``term`` is what the class
  adds to the weights after the base step: ``-lr alpha (g' - g)``, with
  ``lr`` the learning rate that step used (``train_family`` sets it). Leaves
  outside ``kept`` (the library's mask; the class has none) receive ``g``.
  """

  rho: float
  gamma: float
  decoupled: bool = True
  max_norm: float | None = None
  adaptive: bool = False
  eps: float = EPS
  kept: list | None = None
  lr: float = 0.0
  term: dict | None = None

  def clip(self, g: dict) -> dict:
    """PyTorch's clip_grad_norm_: times min(1, max_norm / (||g|| + 1e-6)), every leaf."""
    if self.max_norm is None:
      return g
    scale = min(1.0, self.max_norm / (norm(g) + 1e-6))
    return {k: v * scale for k, v in g.items()}

  def gradient(self, theta: dict, grad_at: Callable[[dict], dict], sam_step: bool = True) -> dict:
    self.term = None
    g = grad_at(theta)
    if not sam_step:  # one pass: g itself (clipped), nothing added
      return self.clip(g)
    e = sam_perturbation(theta, g, self.rho, self.eps, self.adaptive, self.kept)
    gp = self.clip(grad_at(shift(theta, e)))
    g = self.clip(g)
    alpha = self.gamma / (1 - self.gamma)
    kept = list(g) if self.kept is None else self.kept  # the others: g, and no term
    if not self.decoupled:
      return {k: gp[k] * alpha + g[k] * (1 - alpha) if k in kept else g[k] for k in g}
    self.term = {k: -self.lr * alpha * (gp[k] - g[k]) if k in kept else 0.0 * g[k] for k in g}
    return g


def train_family(
  method, base: SGDReference, theta: dict, data: list, rho_at=None, take=None, lr_at=None
) -> list[dict]:
  """The MLP trained with ``method`` then ``base``: the weights after each step.

  ``rho_at(t)``, if given, sets the method's radius at step ``t`` (a schedule);
  ``take[t]``, if given, whether step ``t`` is a two-pass step; ``lr_at(t)``,
  if given, the learning rate of step ``t`` (the base's and the method's). A
  method's ``term``, if it leaves one, is added after the base step.
  """
  path = []
  for t, (x, y) in enumerate(data):
    if rho_at is not None:
      method.rho = rho_at(t)
    if lr_at is not None:
      base.lr = method.lr = lr_at(t)
    chosen = {} if take is None else {"sam_step": take[t]}
    grad = method.gradient(theta, lambda w, x=x, y=y: mlp_loss_and_grad(w, x, y)[1], **chosen)
    theta = base.step(theta, grad)
    term = getattr(method, "term", None)
    if term is not None:
      theta = {k: theta[k] + term[k] for k in theta}
    path.append(theta)
  return path
