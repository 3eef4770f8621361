"""Layered models: the built-in image models as one sequence of ops.

A layered model is a sequence of linear layers (`Conv`, `Dense`) with local
element-wise ops between them (`ReLU`, `MaxPool`, `AvgPool`, `Flatten`,
`Dropout`), ending in a linear layer whose output is the logits
(`LayeredModule`, an ordinary flax linen module). It is only a convenient way
to write such models: its witness, like every model's, is derived from its
step's gradient program (docs/design.md section 12).

Dropout draws its mask from ``fold_in(key, i)`` with i the op's position in
the sequence, so a step's masks are a pure function of its layer key.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

# -- the ops ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Conv:
  """2-D convolution, NHWC, stride 1, "SAME" or "VALID" padding, with bias."""

  features: int
  kernel: tuple[int, int] = (3, 3)
  padding: str = "SAME"

  def __post_init__(self):
    if self.padding not in ("SAME", "VALID"):
      raise ValueError(f"Conv padding must be 'SAME' or 'VALID', got {self.padding!r}")
    if any(k % 2 == 0 for k in self.kernel) and self.padding == "SAME":
      raise ValueError(f"Conv with SAME padding needs an odd kernel, got {self.kernel}")


@dataclasses.dataclass(frozen=True)
class Dense:
  """Fully connected layer on the last axis, with bias."""

  features: int


@dataclasses.dataclass(frozen=True)
class ReLU:
  pass


@dataclasses.dataclass(frozen=True)
class MaxPool:
  """Max-pool with window = stride = `window`, "SAME" padding (as `nn.max_pool`
  with padding="SAME"): odd sizes are padded with -inf at the end."""

  window: int = 2


@dataclasses.dataclass(frozen=True)
class AvgPool:
  """Average-pool with window = stride = `window`, "VALID" (sizes must divide)."""

  window: int = 2


@dataclasses.dataclass(frozen=True)
class Flatten:
  pass


@dataclasses.dataclass(frozen=True)
class Dropout:
  """Inverted dropout; the mask is ``bernoulli(fold_in(key, i), 1 - rate)``."""

  rate: float

  def __post_init__(self):
    if not 0.0 <= self.rate < 1.0:
      raise ValueError(f"Dropout rate must be in [0, 1), got {self.rate!r}")


Linear = Union[Conv, Dense]
Op = Union[Conv, Dense, ReLU, MaxPool, AvgPool, Flatten, Dropout]
LINEAR = (Conv, Dense)
ELEMENTWISE = (ReLU, MaxPool, AvgPool, Flatten, Dropout)


def linear_names(layers: Sequence[Op]) -> tuple[str, ...]:
  """Parameter names of the linear layers, flax-style: Conv_0, Conv_1, Dense_0, ..."""
  counts = {"Conv": 0, "Dense": 0}
  names = []
  for op in layers:
    if isinstance(op, LINEAR):
      kind = type(op).__name__
      names.append(f"{kind}_{counts[kind]}")
      counts[kind] += 1
  return tuple(names)


def check_layers(layers: Sequence[Op]) -> None:
  """Raises ValueError unless `layers` is a valid layered model."""
  if not layers:
    raise ValueError("a layered model needs at least one layer")
  for op in layers:
    if not isinstance(op, LINEAR + ELEMENTWISE):
      raise ValueError(f"{op!r} is not a layered-model op (Conv, Dense, ReLU, MaxPool, AvgPool, "
                       "Flatten, Dropout)")
  if not isinstance(layers[-1], LINEAR):
    raise ValueError("a layered model must end with a linear layer (its output is the logits)")


# -- element-wise ops ------------------------------------------------------------------------


def op_forward(op: Op, i: int, x: jax.Array, *, key: jax.Array | None, train: bool) -> jax.Array:
  """Element-wise op number `i` of the sequence, applied to `x`."""
  if isinstance(op, ReLU):
    return jax.nn.relu(x)
  if isinstance(op, MaxPool):
    if op.window == 1:
      return x
    return nn.max_pool(x, (op.window, op.window), strides=(op.window, op.window), padding="SAME")
  if isinstance(op, AvgPool):
    if x.shape[1] % op.window or x.shape[2] % op.window:
      raise ValueError(f"AvgPool({op.window}) needs sizes divisible by the window, got {x.shape}")
    n, h, w, c = x.shape
    k = op.window
    return x.reshape(n, h // k, k, w // k, k, c).mean(axis=(2, 4))
  if isinstance(op, Flatten):
    return x.reshape((x.shape[0], -1))
  if isinstance(op, Dropout):
    return _dropout(op, i, key, x, train)
  raise TypeError(f"not an element-wise op: {op!r}")


def _dropout(op: Dropout, i: int, key: jax.Array | None, x: jax.Array, train: bool) -> jax.Array:
  """Inverted dropout of `x` with op i's mask; linear in x, so it is its own VJP."""
  if not train or op.rate == 0.0:
    return x
  if key is None:
    raise ValueError("dropout in training mode needs the step's layer key")
  keep = jax.random.bernoulli(jax.random.fold_in(key, i), 1.0 - op.rate, x.shape)
  return jnp.where(keep, x / jnp.asarray(1.0 - op.rate, x.dtype), jnp.zeros_like(x))


# -- the module ------------------------------------------------------------------------------


class LayeredModule(nn.Module):
  """A flax module defined by a sequence of layered-model ops.

  ``__call__(x, *, train=False, key=None)``: `key` drives dropout.
  """

  layers: tuple[Op, ...]

  @nn.compact
  def __call__(self, x, *, train: bool = False, key: jax.Array | None = None):
    check_layers(self.layers)
    names = iter(linear_names(self.layers))
    for i, op in enumerate(self.layers):
      if isinstance(op, Conv):
        x = nn.Conv(op.features, op.kernel, padding=op.padding, name=next(names))(x)
      elif isinstance(op, Dense):
        x = nn.Dense(op.features, name=next(names))(x)
      else:
        x = op_forward(op, i, x, key=key, train=train)
    return x


# -- loss ----------------------------------------------------------------------------------


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy with integer labels (the classifier loss)."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
