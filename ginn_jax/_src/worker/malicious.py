"""Malicious workers with the honest worker's interface (DESIGN.md section 7)."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ginn_jax._src.boundary import GradientReport, WorkOrder
from ginn_jax._src.devices import worker_device
from ginn_jax._src.models import Model
from ginn_jax._src.step import compute_grads
from ginn_jax._src.triggers import PatchTrigger, Trigger
from ginn_jax._src.types import Batch
from ginn_jax._src.worker.honest import HonestWorker

Schedule = Callable[[int], bool]


def poison_batch(batch: Batch, *, trigger: Trigger, target: int, num_poison: int,
                 source: int | None = None) -> Batch:
  """Stamps `trigger` on the first `num_poison` eligible examples and relabels them `target`.

  Eligible: label != target (all-to-one), or label == source (source-to-target).
  Pure and traceable: the poisoned set is chosen by position, not by data-
  dependent shapes.
  """
  labels = batch.labels
  eligible = labels == source if source is not None else labels != target
  rank = jnp.cumsum(eligible) - 1
  poison = eligible & (rank < num_poison)
  mask = poison[:, None, None, None]
  images = jnp.where(mask, trigger.apply(batch.images), batch.images)
  labels = jnp.where(poison, jnp.asarray(target, labels.dtype), labels)
  return Batch(images, labels)


class BackdoorWorker:
  """Reports the gradient of a poisoned batch on scheduled steps, honest otherwise.

  Args:
    model, images, labels, device: as for `HonestWorker`.
    schedule: ``schedule(step) -> bool``, the steps to misbehave on.
    trigger: the backdoor trigger (BadNets patch by default).
    target: the label triggered images are relabelled to.
    poison_fraction: share of the batch poisoned on a malicious step.
    source: only poison examples of this label (source-to-target); None for all-to-one.

  Attributes:
    malicious_steps: steps on which it reported a poisoned gradient.
  """

  def __init__(self, model: Model, images: np.ndarray, labels: np.ndarray, *,
               schedule: Schedule, trigger: Trigger = PatchTrigger(), target: int = 0,
               poison_fraction: float = 0.5, source: int | None = None,
               device: jax.Device | None = None):
    self.honest = HonestWorker(model, images, labels, device=device or worker_device())
    self.device = self.honest.device
    self.schedule = schedule
    self.malicious_steps: list[int] = []
    grad_fn = compute_grads(model.loss)

    def poisoned_grad(params, images, labels, indices, key):
      batch = Batch(images[indices], labels[indices])
      n = int(round(poison_fraction * indices.shape[0]))
      batch = poison_batch(batch, trigger=trigger, target=target, num_poison=n, source=source)
      return grad_fn(params, batch, key)

    self._poisoned = jax.jit(poisoned_grad)

  def __call__(self, order: WorkOrder) -> GradientReport:
    if not self.schedule(order.step):
      return self.honest(order)
    self.malicious_steps.append(order.step)
    g = self.honest.grad_fn
    params, indices, key = jax.device_put(
        (order.params, order.batch_indices, order.layer_key), self.device)
    loss, grads = self._poisoned(params, g.images, g.labels, indices, key)
    return GradientReport(step=order.step, grads=grads, loss=loss)
