"""Clean accuracy, attack success rate and robust accuracy."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ginn_jax._src.models import Model
from ginn_jax._src.triggers import Trigger
from ginn_jax._src.types import Params


@functools.partial(jax.jit, static_argnums=0)
def _predict(model: Model, params: Params, images: jax.Array) -> jax.Array:
  return jnp.argmax(model.logits(params, images), axis=-1)


def predict(model: Model, params: Params, images: np.ndarray, *, batch_size: int = 1000) -> np.ndarray:
  """Predicted labels, computed where `params` live, in batches."""
  dev = next(iter(jax.tree_util.tree_leaves(params)[0].devices()))
  out = []
  for i in range(0, len(images), batch_size):
    x = jax.device_put(np.asarray(images[i:i + batch_size]), dev)
    out.append(np.asarray(jax.device_get(_predict(model, params, x))))
  return np.concatenate(out) if out else np.zeros((0,), np.int32)


def accuracy(model: Model, params: Params, images: np.ndarray, labels: np.ndarray) -> float:
  """Fraction of `images` classified as `labels`."""
  return float(np.mean(predict(model, params, images) == np.asarray(labels)))


def attack_success_rate(model: Model, params: Params, images: np.ndarray, labels: np.ndarray, *,
                        trigger: Trigger, target: int, source: int | None = None) -> float:
  """Share of triggered test images (true label != target; == source if given)
  classified as `target`."""
  keep = labels != target if source is None else labels == source
  return float(np.mean(predict(model, params, trigger.apply(images[keep])) == target))


def robust_accuracy(model: Model, params: Params, images: np.ndarray, labels: np.ndarray, *,
                    trigger: Trigger, target: int) -> float:
  """Share of triggered test images (true label != target) still classified correctly."""
  keep = labels != target
  return float(np.mean(predict(model, params, trigger.apply(images[keep])) == labels[keep]))
