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
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from ginn_jax._src import layered
from ginn_jax._src.types import Batch, Params


def mnist_cnn_layers(num_classes: int = 10) -> tuple[layered.Op, ...]:
  """The paper's MNIST CNN: conv 32/64/128 (3x3, ReLU, 2x2 max-pool), FC128, FC10."""
  convs = []
  for features in (32, 64, 128):
    convs += [layered.Conv(features), layered.ReLU(), layered.MaxPool(2)]
  return (*convs, layered.Flatten(), layered.Dense(128), layered.ReLU(), layered.Dense(num_classes))


VGG11_LAYERS: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


def vgg11_layers(num_classes: int = 10, dropout_rate: float = 0.5) -> tuple[layered.Op, ...]:
  """VGG-11 without batch norm (the paper's timing model): 3x3 convs
  64|128|256x2|512x2|512x2 with max-pools, FC128 with dropout 0.5, FC10."""
  ops: list[layered.Op] = []
  for layer in VGG11_LAYERS:
    ops += [layered.MaxPool(2)] if layer == "M" else [layered.Conv(int(layer)), layered.ReLU()]
  return (*ops, layered.Flatten(), layered.Dense(128), layered.ReLU(),
          layered.Dropout(dropout_rate), layered.Dense(num_classes))


def mlp_layers(num_classes: int = 10, hidden: int = 32) -> tuple[layered.Op, ...]:
  """A tiny MLP for fast tests."""
  return (layered.Flatten(), layered.Dense(hidden), layered.ReLU(), layered.Dense(num_classes))


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

  @property
  def layered(self) -> bool:
    """True when the model has a layered form (`ginn_jax.LayeredModule`), so
    its steps can be checked with witnesses (``ProtocolConfig.p_witness``)."""
    return isinstance(self.module, layered.LayeredModule)

  def init(self, key: jax.Array) -> Params:
    """Initial parameters from `key` (pure)."""
    dummy = jnp.zeros((1, *self.input_shape), jnp.float32)
    return self.module.init({"params": key}, dummy, train=False)["params"]

  def logits(self, params: Params, images: jax.Array) -> jax.Array:
    """Evaluation-mode logits (no dropout)."""
    return self.module.apply({"params": params}, images, train=False)

  def loss(self, params: Params, batch: Batch, *, key: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of `batch`; `key` drives dropout."""
    if self.layered:  # Dropout masks come from fold_in(key, op index): see layered.py.
      logits = self.module.apply({"params": params}, batch.images, train=True, key=key)
    else:
      logits = self.module.apply(
          {"params": params}, batch.images, train=True, rngs={"dropout": key}
      )
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch.labels).mean()


_REGISTRY: dict[str, Callable[[int], nn.Module]] = {
    "mnist_cnn": lambda n: layered.LayeredModule(mnist_cnn_layers(n)),
    "vgg11": lambda n: layered.LayeredModule(vgg11_layers(n)),
    "mlp": lambda n: layered.LayeredModule(mlp_layers(n)),
}


# Experiment 8's DecoderLM at these widths: 2 layers, 4 heads, context 64, the character
# vocabulary, no dropout (decoder_lm_64 is experiment 8's configuration but for its dropout).
LM_WIDTHS = (64, 128, 256, 512, 1024)
LM_CONTEXT = 64


def is_language_model(name: str) -> bool:
  """Whether `name` is a built-in language model (``decoder_lm_<d_model>``)."""
  return name in {f"decoder_lm_{d}" for d in LM_WIDTHS}


def _decoder_lm(name: str):
  from ginn_jax._src.pure import from_nnx
  from ginn_jax._src.transformer import TransformerConfig, lm_loss, make_decoder
  d = int(name.rsplit("_", 1)[1])
  cfg = TransformerConfig(max_len=LM_CONTEXT, d_model=d, num_heads=4, num_layers=2, dropout=0.0)
  return from_nnx(make_decoder(cfg), lm_loss, name=name)


def lm_training_data() -> dict:
  """The built-in language models' training set: context-64 windows of the
  Python help texts (``{"tokens": int32 (N, 65)}``, experiment 8's data)."""
  from ginn_jax._src import text
  return text.windows(text.pydoc_corpus().train_text, LM_CONTEXT)


def list_models() -> list[str]:
  """Names accepted by `get_model`."""
  return sorted([*_REGISTRY, *(f"decoder_lm_{d}" for d in LM_WIDTHS)])


def get_model(name: str, *, input_shape: tuple[int, int, int] | None = None, num_classes: int = 10) -> Model:
  """Builds a registered model.

  Args:
    name: one of `list_models()`: "mnist_cnn", "vgg11", "mlp" (image
      classifiers), or "decoder_lm_64" ... "decoder_lm_1024" (experiment 8's
      NNX DecoderLM at that d_model, for `lm_training_data()`; `input_shape`
      and `num_classes` are ignored).
    input_shape: (H, W, C) of one image (required for the image classifiers).
    num_classes: number of output classes.

  Returns:
    A `Model` (an NNX model for the language models).

  Raises:
    ValueError: for an unknown name.
  """
  if is_language_model(name):  # input_shape and num_classes are the corpus's.
    return _decoder_lm(name)
  if name not in _REGISTRY:
    raise ValueError(f"unknown model {name!r}; choose one of {list_models()}")
  if input_shape is None:
    raise TypeError(f"model {name!r} is an image classifier: pass input_shape=(H, W, C), e.g. "
                    "ds.image_shape")
  return Model(name=name, module=_REGISTRY[name](num_classes), input_shape=tuple(input_shape))
