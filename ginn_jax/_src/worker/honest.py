"""The honest worker: `value_and_grad` of the model's pure loss, jitted on its device."""
from __future__ import annotations

from typing import Any, Literal, Protocol

import jax
import numpy as np

from ginn_jax._src.boundary import GradientReport, Witness, WitnessRequest, WorkOrder
from ginn_jax._src import finetune
from ginn_jax._src.data import as_training_data
from ginn_jax._src.devices import worker_device
from ginn_jax._src.models import Model
from ginn_jax._src.program import UnsupportedProgram
from ginn_jax._src.step import DeviceGradFn, DeviceWitnessFn


class Worker(Protocol):
  """Anything that turns a work order into a gradient report.

  A worker that can answer witness challenges (``ProtocolConfig.p_witness``)
  also has ``witness(request: WitnessRequest) -> Witness``.
  """

  def __call__(self, order: WorkOrder) -> GradientReport:
    ...


def worker_frozen(model, frozen):
  """The frozen tree a worker computes with: `frozen`, or the model's
  pretrained base; None for a model without frozen parameters."""
  if not finetune.has_frozen(model):
    if frozen is not None:
      raise TypeError(f"frozen= was given, but model {getattr(model, 'name', model)!r} has no "
                      "frozen parameters (use ginn_jax.lora or ginn_jax.freeze)")
    return None
  if frozen is None:
    try:
      frozen = model.frozen_params()
    except TypeError as e:
      raise TypeError(f"{e}. Pass frozen=rt.frozen to the worker.") from None
  return frozen


class HonestWorker:
  """Computes exactly what the work order asks for.

  Args:
    model: the model (its pure `loss`).
    data: the worker's copy of the training set (any pytree of arrays with a
      leading example axis, or images and labels), put on `device` once.
    device: where to compute; default `ginn_jax.worker_device()`.
    witness: "keep" computes each step's witness (the output of every product
      of the step's program, docs/design.md section 12) with its gradient, in
      one pass, and keeps the last step's on the device until the next step;
      "recompute" computes the plain gradient and, when challenged, the
      witness again from the work order; "auto" (the default) is "recompute"
      until the first challenge and "keep" from then on (a run without
      witness checks computes nothing for them). Either way at most one step's
      witness is held at a time. The witness pass's gradient is that of the
      same program with its products as outputs, which XLA may round
      differently from the plain pass (about 1e-8 relative on CPU), well
      inside any re-computation tolerance.
    frozen: the frozen parameters of a model that has them (`ginn_jax.lora`,
      `ginn_jax.freeze`), sent once at start (``rt.frozen``) and put on
      `device` once; default: the model's pretrained base
      (``model.frozen_params()``). Reports carry the trainable tree only.
  """

  def __init__(self, model: Model, data: Any = None, labels: np.ndarray | None = None, *,
               device: jax.Device | None = None, witness: Literal["auto", "keep", "recompute"] = "auto",
               images: np.ndarray | None = None, frozen: Any = None):
    if witness not in ("auto", "keep", "recompute"):
      raise ValueError(f"witness must be 'auto', 'keep' or 'recompute', got {witness!r}")
    self.model = model
    self.device = device or worker_device()
    data = as_training_data(data, labels, images=images)
    frozen = worker_frozen(model, frozen)
    self.grad_fn = DeviceGradFn(model.loss, data, self.device, frozen=frozen)
    self.witness_fn = DeviceWitnessFn(model.loss, self.grad_fn.data, self.device,
                                      frozen=self.grad_fn.frozen)
    self.keep = witness == "keep"
    self._auto = witness == "auto"
    self._kept: Witness | None = None

  def __call__(self, order: WorkOrder) -> GradientReport:
    if self.keep:
      try:
        loss, grads, outputs, input_grads = self.witness_fn(order.params, order.batch_indices,
                                                             order.layer_key)
      except UnsupportedProgram:  # No witness to keep: the plain step (a challenge says why).
        self.keep = False
        return self(order)
      self._kept = Witness(step=order.step, outputs=outputs, input_grads=input_grads)
      return GradientReport(step=order.step, grads=grads, loss=loss)
    loss, grads = self.grad_fn(order.params, order.batch_indices, order.layer_key)
    return GradientReport(step=order.step, grads=grads, loss=loss)

  def witness(self, request: WitnessRequest) -> Witness:
    """The witness of the requested step: the kept one, or computed again.

    Raises:
      UnsupportedProgram: the model's program has a product the check cannot follow.
    """
    if self._auto:  # Challenged once: witness checks are on, keep from now on.
      self.keep, self._auto = True, False
    kept, self._kept = self._kept, None
    if kept is not None and kept.step == request.step:
      return kept
    order = request.order
    _, _, outputs, input_grads = self.witness_fn(order.params, order.batch_indices, order.layer_key)
    return Witness(step=request.step, outputs=outputs, input_grads=input_grads)
