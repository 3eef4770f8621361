"""Models as flax modules behind one pure loss interface.

A `Model` bundles a flax module with three pure functions:

* ``init(key) -> params``
* ``loss(params, batch, *, key) -> scalar`` (the key drives dropout)
* ``logits(params, images) -> logits`` (evaluation: no dropout)

Supported: modules whose only state is their parameters. Mutable collections
(batch-norm statistics) are not supported: the GINN step is a pure function of
(params, batch, key), and a model with hidden state would make the worker's
report depend on something the trusted runtime does not hold. Use layer or
group normalisation instead.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from ginn_jax._src.types import Batch, Params


class MnistCNN(nn.Module):
  """The paper's MNIST CNN: conv 32/64/128 (3x3, ReLU, 2x2 max-pool), FC128, FC10."""

  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    del train  # No dropout in this model.
    for features in (32, 64, 128):
      x = nn.relu(nn.Conv(features, (3, 3), padding="SAME")(x))
      x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(128)(x))
    return nn.Dense(self.num_classes)(x)


VGG11_LAYERS: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG11(nn.Module):
  """VGG-11 without batch norm (the paper's timing model): 3x3 convs
  64|128|256x2|512x2|512x2 with max-pools, FC128 with dropout 0.5, FC10."""

  num_classes: int = 10
  layers: Sequence[int | str] = VGG11_LAYERS
  dropout_rate: float = 0.5

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    for layer in self.layers:
      if layer == "M":
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
      else:
        x = nn.relu(nn.Conv(int(layer), (3, 3), padding="SAME")(x))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(128)(x))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes)(x)


class MLP(nn.Module):
  """A tiny MLP for fast tests."""

  num_classes: int = 10
  hidden: int = 32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    del train
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.hidden)(x))
    return nn.Dense(self.num_classes)(x)


@dataclasses.dataclass(frozen=True)
class Model:
  """A flax module with the pure functions the protocol needs.

  Attributes:
    name: registry name ("mnist_cnn", "vgg11", "mlp") or a user label.
    module: the flax module.
    input_shape: (H, W, C) of one image.
  """

  name: str
  module: nn.Module
  input_shape: tuple[int, int, int]

  def init(self, key: jax.Array) -> Params:
    """Initial parameters from `key` (pure)."""
    dummy = jnp.zeros((1, *self.input_shape), jnp.float32)
    return self.module.init({"params": key}, dummy, train=False)["params"]

  def logits(self, params: Params, images: jax.Array) -> jax.Array:
    """Evaluation-mode logits (no dropout)."""
    return self.module.apply({"params": params}, images, train=False)

  def loss(self, params: Params, batch: Batch, *, key: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of `batch`; `key` drives dropout."""
    logits = self.module.apply(
        {"params": params}, batch.images, train=True, rngs={"dropout": key}
    )
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch.labels).mean()


_REGISTRY: dict[str, Callable[[int], nn.Module]] = {
    "mnist_cnn": lambda n: MnistCNN(num_classes=n),
    "vgg11": lambda n: VGG11(num_classes=n),
    "mlp": lambda n: MLP(num_classes=n),
}


def list_models() -> list[str]:
  """Names accepted by `get_model`."""
  return sorted(_REGISTRY)


def get_model(name: str, *, input_shape: tuple[int, int, int], num_classes: int = 10) -> Model:
  """Builds a registered model.

  Args:
    name: one of `list_models()`.
    input_shape: (H, W, C) of one image.
    num_classes: number of output classes.

  Returns:
    A `Model`.

  Raises:
    ValueError: for an unknown name.
  """
  if name not in _REGISTRY:
    raise ValueError(f"unknown model {name!r}; choose one of {list_models()}")
  return Model(name=name, module=_REGISTRY[name](num_classes), input_shape=tuple(input_shape))
