"""When a malicious worker misbehaves: predicates ``schedule(step) -> bool``."""
from __future__ import annotations

import dataclasses
import hashlib


@dataclasses.dataclass(frozen=True)
class FromStep:
  """Every step from `start` on."""

  start: int

  def __call__(self, step: int) -> bool:
    return step >= self.start


@dataclasses.dataclass(frozen=True)
class Window:
  """Steps in ``[start, stop)``."""

  start: int
  stop: int

  def __call__(self, step: int) -> bool:
    return self.start <= step < self.stop


@dataclasses.dataclass(frozen=True)
class Steps:
  """Exactly the given steps (k = len(steps))."""

  steps: frozenset[int]

  def __init__(self, steps):
    object.__setattr__(self, "steps", frozenset(int(s) for s in steps))

  def __call__(self, step: int) -> bool:
    return step in self.steps


@dataclasses.dataclass(frozen=True)
class RandomRate:
  """Each step independently with probability `rate` (reproducible from `seed`)."""

  rate: float
  seed: int = 0

  def __call__(self, step: int) -> bool:
    h = hashlib.sha256(f"{self.seed}/{step}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64 < self.rate


Always = lambda: FromStep(0)  # noqa: E731
