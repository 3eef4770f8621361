"""The honest worker: `value_and_grad` of the model's pure loss, jitted on its device."""
from __future__ import annotations

from typing import Protocol

import jax
import numpy as np

from ginn_jax._src.boundary import GradientReport, WorkOrder
from ginn_jax._src.devices import worker_device
from ginn_jax._src.models import Model
from ginn_jax._src.step import DeviceGradFn


class Worker(Protocol):
  """Anything that turns a work order into a gradient report."""

  def __call__(self, order: WorkOrder) -> GradientReport:
    ...


class HonestWorker:
  """Computes exactly what the work order asks for.

  Args:
    model: the model (its pure `loss`).
    images, labels: the worker's copy of the training set, put on `device` once.
    device: where to compute; default `ginn_jax.worker_device()`.
  """

  def __init__(self, model: Model, images: np.ndarray, labels: np.ndarray, *, device: jax.Device | None = None):
    self.model = model
    self.device = device or worker_device()
    self.grad_fn = DeviceGradFn(model.loss, images, labels, self.device)

  def __call__(self, order: WorkOrder) -> GradientReport:
    loss, grads = self.grad_fn(order.params, order.batch_indices, order.layer_key)
    return GradientReport(step=order.step, grads=grads, loss=loss)
