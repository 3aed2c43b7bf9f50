"""The fixed data split and the symmetric label noise shared by the example studies."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Data:
  """A fixed train/validation/test split: inputs ``x_*`` and integer labels ``y_*``."""

  x_train: np.ndarray
  y_train: np.ndarray
  x_val: np.ndarray
  y_val: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray


def symmetric_noise(
  labels: np.ndarray, rate: float, rng: np.random.Generator, num_classes: int = 10
) -> np.ndarray:
  """Gives exactly ``round(rate * N)`` random labels a different, uniformly drawn class.

  >>> labels = np.zeros(10, np.int64)
  >>> noisy = symmetric_noise(labels, 0.3, np.random.default_rng(0))
  >>> int((noisy != labels).sum())
  3
  """
  noisy = labels.copy()
  flip = rng.choice(len(labels), size=round(rate * len(labels)), replace=False)
  # Adding 1..K-1 modulo K picks each wrong class with equal probability.
  noisy[flip] = (labels[flip] + rng.integers(1, num_classes, size=len(flip))) % num_classes
  return noisy


def noisy_labels(
  data: Data, noise: float, seed: int, *, noise_scale: int
) -> tuple[np.ndarray, np.ndarray]:
  """Train and validation labels with the noise of one seed; the test labels stay clean.

  The draw depends on ``seed``, on ``round(noise * noise_scale)`` and on the part,
  never on the method, so runs with the same seed share their noisy labels.
  """
  train, val = (
    symmetric_noise(y, noise, np.random.default_rng([seed, round(noise * noise_scale), part]))
    for part, y in enumerate((data.y_train, data.y_val))
  )
  return train, val
