"""The one gradient function, shared by the worker and the trusted verifier.

docs/design.md section 4: the verifier calls exactly the same function as the
worker, so there is no second implementation of the model to drift apart. This
module holds that function; `worker/` and `trusted/` both import it, neither
imports the other.
"""
from __future__ import annotations

import functools

import jax
import numpy as np

from ginn_jax._src.types import Batch, GradFn, LossFn, Params, PyTree


def compute_grads(loss_fn: LossFn) -> GradFn:
  """Returns the pure ``grad_fn(params, batch, key, frozen=None) -> (loss,
  grads)`` of `loss_fn`. With `frozen` (the frozen parameters of a model that
  has them, e.g. `ginn_jax.lora`) the loss is called with ``frozen=`` and the
  gradient is of the trained `params` only."""

  def grad_fn(params: Params, batch: Batch, key: jax.Array, frozen: Params | None = None):
    if frozen is None:
      return jax.value_and_grad(lambda p: loss_fn(p, batch, key=key))(params)
    return jax.value_and_grad(lambda p: loss_fn(p, batch, key=key, frozen=frozen))(params)

  return grad_fn


def gather(data: PyTree, indices) -> PyTree:
  """The batch of `indices`: every leaf of the training set `data` indexed
  along its leading example axis (traceable; runs where `data` lives)."""
  return jax.tree_util.tree_map(lambda leaf: leaf[indices], data)


def gather_and_grad(grad_fn: GradFn):
  """Wraps `grad_fn` to gather the batch from a device-resident dataset.

  Returns ``f(params, data, indices, key, frozen=None) -> (loss, grads)``:
  the batch is ``gather(data, indices)`` (for image data,
  ``Batch(images[indices], labels[indices])``), gathered on the device the
  arrays live on, so a dataset put once on the worker never crosses again.
  """

  def f(params, data, indices, key, frozen=None):
    return grad_fn(params, gather(data, indices), key, frozen)

  return f


@functools.lru_cache(maxsize=64)
def _jitted_gather_and_grad(owner, func):
  """One jitted function per loss (equal models share it, so a new worker or
  runtime for the same model does not recompile)."""
  loss_fn = func.__get__(owner) if owner is not None else func
  return jax.jit(gather_and_grad(compute_grads(loss_fn)))


class DeviceGradFn:
  """`gather_and_grad(compute_grads(loss_fn))` jitted, pinned to one device, with
  float32 matmuls at full precision (GPUs default to TF32, which widens the gap
  an attacker can hide in).

  The training set `data` (any pytree of arrays with a leading example axis;
  ``Batch(images, labels)`` for image data) is put on `device` once; each call
  moves only the parameters, the indices and the key, explicitly with
  `jax.device_put`. ``DeviceGradFn(loss_fn, images, labels, device)`` is the
  same as ``DeviceGradFn(loss_fn, Batch(images, labels), device)``.

  `frozen`: the frozen parameters of a model that has them (docs/design.md
  section 13), put on `device` once, like the data.
  """

  def __init__(self, loss_fn: LossFn, data: PyTree, *rest, frozen: Params | None = None):
    if len(rest) == 2:  # (images, labels, device)
      data, rest = Batch(data, rest[0]), rest[1:]
    if len(rest) != 1:
      raise TypeError("DeviceGradFn(loss_fn, data, device) or (loss_fn, images, labels, device)")
    self.device = rest[0]
    self._fn = _jitted_gather_and_grad(
        getattr(loss_fn, "__self__", None), getattr(loss_fn, "__func__", loss_fn))
    self.data = jax.device_put(data, self.device)
    self.frozen = None if frozen is None else jax.device_put(frozen, self.device)

  @property
  def images(self) -> jax.Array:
    """The images of image classification data (``data.images``)."""
    return _image_field(self.data, "images")

  @property
  def labels(self) -> jax.Array:
    """The labels of image classification data (``data.labels``)."""
    return _image_field(self.data, "labels")

  def __call__(self, params: Params, indices, key: jax.Array) -> tuple[jax.Array, Params]:
    params, indices, key = jax.device_put((params, indices, key), self.device)
    with jax.default_matmul_precision("highest"):
      return self._fn(params, self.data, indices, key, self.frozen)


def _image_field(data: PyTree, field: str) -> jax.Array:
  if not isinstance(data, Batch):
    raise TypeError(
        f"this needs image classification data (a ginn_jax.Batch of images and labels), but the "
        f"training set is a {type(data).__name__}; attacks and witness checks that read "
        f"{field} work on image data only (ginn_jax.PoisonWorker poisons any pytree batch)")
  return getattr(data, field)


@functools.lru_cache(maxsize=64)
def _jitted_gather_and_witness(program):
  from ginn_jax._src import program as program_lib

  def f(params, data, indices, key, frozen=None):
    return program_lib.loss_grads_and_products(program, params, gather(data, indices), key, frozen)

  return jax.jit(f)


def batch_shapes(data: PyTree, batch_size: int) -> PyTree:
  """ShapeDtypeStructs of a batch of `batch_size` examples of `data`."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct((batch_size, *x.shape[1:]), x.dtype), data)


def step_program(loss_fn: LossFn, params: Params, data: PyTree, batch_size: int,
                 frozen: Params | None = None):
  """The gradient program of `loss_fn` for a batch of `batch_size` examples of
  `data` (`ginn_jax._src.program.Program`; traced once per shapes)."""
  from ginn_jax._src import program as program_lib
  key = jax.eval_shape(lambda: jax.random.key(0))
  return program_lib.program_of(loss_fn, params, batch_shapes(data, batch_size), key, frozen)


class DeviceWitnessFn:
  """Like `DeviceGradFn`, returning the witness too: ``(loss, grads, products,
  ())`` with `products` the output of every witnessed product of the step's
  program, in plan order (docs/design.md section 12), computed in the same
  jitted function as the gradient.

  Args:
    loss_fn: the model's pure loss.
    data: the training set (as for `DeviceGradFn`; already on `device` or put there once).
    device: where to compute.
    frozen: the model's frozen parameters, if it has any (put on `device` once).
  """

  def __init__(self, loss_fn: LossFn, data: PyTree, device: jax.Device, *,
               frozen: Params | None = None):
    self.device = device
    self.loss_fn = loss_fn
    self.data = jax.device_put(data, device)
    self.frozen = None if frozen is None else jax.device_put(frozen, device)
    self._programs: dict[int, object] = {}  # By batch size (the parameters' shapes are the model's).

  def program(self, params, batch_size: int):
    """The step's program for batches of `batch_size` (traced once, then kept)."""
    if batch_size not in self._programs:
      self._programs[batch_size] = step_program(self.loss_fn, params, self.data, batch_size,
                                                self.frozen)
    return self._programs[batch_size]

  def __call__(self, params: Params, indices, key: jax.Array):
    params, indices, key = jax.device_put((params, indices, key), self.device)
    fn = _jitted_gather_and_witness(self.program(params, int(np.shape(indices)[0])))
    with jax.default_matmul_precision("highest"):
      loss, grads, products = fn(params, self.data, indices, key, self.frozen)
    return loss, grads, list(products), []
