"""Base types shared by the trusted runtime, the worker and the models.

Nothing in this module computes anything: it names the shapes of things so the
rest of the library can be read against one list.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Protocol

import jax
import numpy as np

PyTree = Any
Params = PyTree
ArrayLike = jax.typing.ArrayLike


class Batch(NamedTuple):
  """A mini-batch: images NHWC float32 in [0, 1] and int32 labels."""

  images: jax.Array | np.ndarray
  labels: jax.Array | np.ndarray


class LossFn(Protocol):
  """The one pure loss interface used by worker and trusted side alike."""

  def __call__(self, params: Params, batch: Batch, *, key: jax.Array) -> jax.Array:
    ...


GradFn = Callable[[Params, Batch, jax.Array], tuple[jax.Array, Params]]
"""`grad_fn(params, batch, key) -> (loss, grads)`."""
