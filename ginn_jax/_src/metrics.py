"""Metrics: `evaluate` for any model and data; clean accuracy, attack success
rate and robust accuracy for image classifiers."""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ginn_jax._src.models import Model
from ginn_jax._src.triggers import Trigger
from ginn_jax._src.step import gather
from ginn_jax._src.types import Params, PyTree


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


def evaluate(metric: Callable[[Params, PyTree], jax.Array], params: Params, data: PyTree, *,
             batch_size: int = 256) -> float:
  """The mean of a per-batch metric over a dataset: the metric of your model.

  Args:
    metric: ``metric(params, batch) -> scalar``, the mean of the metric over
      the examples of `batch` (a loss, an accuracy, a token accuracy...);
      jitted here and computed where `params` live.
    params: the parameters (e.g. ``result.params``).
    data: any pytree of arrays with a leading example axis.
    batch_size: examples per batch (the last batch may be smaller).

  Returns:
    The example-weighted mean of `metric` over all of `data`.

  Example::

    perplexity = math.exp(ginn.evaluate(
        lambda p, b: model.loss(p, b, key=jax.random.key(0)), result.params, test))
  """
  dev = next(iter(jax.tree_util.tree_leaves(params)[0].devices()))
  n = int(jax.tree_util.tree_leaves(data)[0].shape[0])
  if n == 0:
    raise ValueError("evaluate needs at least one example")
  fn = jax.jit(metric)
  host = jax.tree_util.tree_map(np.asarray, data)  # Once, not per batch.
  total = 0.0
  for i in range(0, n, batch_size):
    idx = np.arange(i, min(i + batch_size, n))
    batch = jax.device_put(gather(host, idx), dev)
    total += float(jax.device_get(fn(params, batch))) * len(idx)
  return total / n
