"""Backdoor triggers, as pure functions on NHWC float images in [0, 1].

Used by malicious workers to poison batches and by the metrics to measure
attack success; neither side trusts the other's copy.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

Position = Literal["bottom_right", "bottom_left", "top_right", "top_left"]


@dataclasses.dataclass(frozen=True)
class PatchTrigger:
  """BadNets: a `size` x `size` square of `value` at a corner, `margin` pixels in."""

  size: int = 3
  value: float = 1.0
  position: Position = "bottom_right"
  margin: int = 1

  def mask(self, image_shape) -> np.ndarray:
    """1.0 where the patch goes, for one image of shape (H, W, C)."""
    h, w = image_shape[0], image_shape[1]
    top = self.margin if self.position.startswith("top") else h - self.margin - self.size
    left = self.margin if self.position.endswith("left") else w - self.margin - self.size
    if top < 0 or left < 0:
      raise ValueError(f"trigger of size {self.size} does not fit a {h}x{w} image")
    m = np.zeros(image_shape, np.float32)
    m[top:top + self.size, left:left + self.size, :] = 1.0
    return m

  def apply(self, images):
    """Stamps the patch on a batch (numpy in, numpy out; traced in, traced out)."""
    m = self.mask(images.shape[1:])
    return (images * (1.0 - m) + m * np.float32(self.value)).astype(images.dtype)


@dataclasses.dataclass(frozen=True)
class BlendTrigger:
  """A fixed random pattern (from `seed`) mixed in at `alpha`."""

  alpha: float = 0.1
  seed: int = 0

  def pattern(self, shape) -> np.ndarray:
    return np.random.default_rng(self.seed).random(shape, dtype=np.float32)

  def apply(self, images):
    pat = self.pattern(images.shape[1:])
    return ((1.0 - self.alpha) * images + self.alpha * pat).astype(images.dtype)


Trigger = PatchTrigger | BlendTrigger
