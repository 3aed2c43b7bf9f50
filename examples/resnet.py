"""ResNet-18 for 32x32 images (CIFAR variant), in Flax NNX.

The one ResNet of the repository: ``examples/cifar.py`` trains it and
``benchmarks/resnet18.py`` times it.
"""

from __future__ import annotations

import jax
from flax import nnx


class BasicBlock(nnx.Module):
  """Two 3x3 conv-BN layers with a residual (1x1 conv-BN when the shape changes)."""

  def __init__(self, cin: int, cout: int, stride: int, *, rngs: nnx.Rngs):
    conv = lambda i, o, k, s: nnx.Conv(
      i, o, (k, k), strides=s, padding=k // 2, use_bias=False, rngs=rngs
    )
    self.conv1, self.bn1 = conv(cin, cout, 3, stride), nnx.BatchNorm(cout, rngs=rngs)
    self.conv2, self.bn2 = conv(cout, cout, 3, 1), nnx.BatchNorm(cout, rngs=rngs)
    self.project = stride != 1 or cin != cout
    if self.project:
      self.short_conv, self.short_bn = conv(cin, cout, 1, stride), nnx.BatchNorm(cout, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    bn = dict(use_running_average=not train)
    y = nnx.relu(self.bn1(self.conv1(x), **bn))
    y = self.bn2(self.conv2(y), **bn)
    shortcut = self.short_bn(self.short_conv(x), **bn) if self.project else x
    return nnx.relu(y + shortcut)


class ResNet18(nnx.Module):
  """ResNet-18 for 32x32 inputs: 3x3 stem, no max-pool, stages of 2 blocks."""

  def __init__(self, num_classes: int, width: int = 64, *, rngs: nnx.Rngs):
    self.stem = nnx.Conv(3, width, (3, 3), padding=1, use_bias=False, rngs=rngs)
    self.bn = nnx.BatchNorm(width, rngs=rngs)
    blocks, cin = [], width
    for stage, stride in enumerate((1, 2, 2, 2)):
      cout = width * 2**stage
      blocks += [BasicBlock(cin, cout, stride, rngs=rngs), BasicBlock(cout, cout, 1, rngs=rngs)]
      cin = cout
    self.blocks = nnx.List(blocks)
    self.head = nnx.Linear(cin, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = nnx.relu(self.bn(self.stem(x), use_running_average=not train))
    for block in self.blocks:
      x = block(x, train=train)
    return self.head(x.mean(axis=(1, 2)))
