"""The data-parallel worker: S shards of each step over a mesh of devices.

`ShardedWorker` cuts the work order's batch into S shards the one documented
way (`ginn_jax._src.shards`: shard s gets the contiguous indices
``[s*B/S, (s+1)*B/S)`` and the layer key ``fold_in(layer_key, s)``) and
computes every shard's gradient with the one gradient function of `step.py`,
the function the trusted verifier re-runs on a sampled shard.

How it computes (S > 1), over a `jax.sharding.Mesh` of M devices (M divides S):

* the parameters and the training set are replicated over the mesh
  (``NamedSharding(mesh, P())``; the training set is put there once);
* the ``(S, B/S)`` shard indices and the ``(S,)`` shard keys are split along
  the leading axis over *all* the mesh's axes
  (``NamedSharding(mesh, P(mesh.axis_names))``): device i holds shards
  ``[i*S/M, (i+1)*S/M)``, in the mesh's device order;
* one jitted `jax.shard_map` runs, on every device, ``grad_fn`` of each of its
  S/M local shards in turn (a Python loop, unrolled: no `vmap`, so every shard
  is computed exactly as the standalone per-shard function computes it:
  bitwise equal on CPU, `tests/test_shards.py`), with float32 matmuls at
  ``"highest"`` precision. ``check_vma=False``: the gradient of a replicated
  input must stay per device (with the check on, jax would sum it over the
  mesh);
* the report is one `GradientReport` whose gradient leaves are global arrays
  of shape ``(S, *param.shape)`` and whose loss has shape ``(S,)``, sharded
  over the mesh like the indices.

In ``"aggregate"`` mode (``shard_mode``, docs/design.md section 11.2) a
second jitted `shard_map` adds each device's shard gradients and sums those
over the mesh with the mesh's own collective (one ``jax.lax.psum``, which
also gathers the losses), divided by S: the report's gradient is that mean
(every leaf shaped as its parameter; the copy on this process's first mesh
device), and its loss the ``(S,)`` shard losses. The shard
gradients stay on their devices until the next step, to answer the
projection challenge (`project`: one jitted `shard_map` projecting each
shard's leaves with the trusted side's vectors, no gradient leaving its
device).

With S = 1 it is an `HonestWorker` on the mesh's first device: the same
report, without a shard axis, as today's worker.

A mesh may span processes (`jax.distributed`): inputs are placed with
`jax.make_array_from_callback` when the mesh is not fully addressable, so
every process passes the same host values and each places its own devices'
pieces.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ginn_jax._src import shards as shards_lib
from ginn_jax._src.boundary import (GradientReport, ProjectionRequest, Projections, Witness,
                                    WitnessRequest, WorkOrder)
from ginn_jax._src.data import as_training_data
from ginn_jax._src.devices import worker_devices
from ginn_jax._src.models import Model
from ginn_jax._src.step import DeviceWitnessFn, compute_grads, gather
from ginn_jax._src.types import Batch
from ginn_jax._src.worker.honest import HonestWorker


def default_mesh(num_shards: int, devices: list[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh (axis ``"shards"``) over as many of `devices` (default
  `worker_devices()`) as divide `num_shards`: the largest M <= len(devices)
  with ``num_shards % M == 0``."""
  devices = list(devices) if devices is not None else worker_devices()
  m = max(d for d in range(1, min(len(devices), num_shards) + 1) if num_shards % d == 0)
  return Mesh(np.array(devices[:m]), (shards_lib.SHARD_AXIS,))


def _first(x: jax.Array) -> jax.Array:
  """This process's first copy of a replicated array (one device)."""
  return x.addressable_data(0)


def _put(x, sharding: NamedSharding):
  """`x` (host or device arrays, a pytree) placed with `sharding`: `jax.device_put`
  when this process addresses the whole mesh, else each process places its
  own devices' pieces from its (identical) host copy."""
  if sharding.is_fully_addressable:
    return jax.device_put(x, sharding)

  def one(a):  # device_put of a host value places this process's pieces only (explicit,
    # unlike make_array_from_callback, which a transfer guard stops).
    return jax.device_put(np.asarray(jax.device_get(a)), sharding)

  return jax.tree_util.tree_map(one, x)


@functools.lru_cache(maxsize=32)
def _sharded_grad(owner, func, mesh: Mesh, num_shards: int):
  """The jitted shard_map of the per-shard gradient over `mesh` (cached per
  loss, mesh and shard count, so equal workers share one compilation)."""
  loss_fn = func.__get__(owner) if owner is not None else func
  grad_fn = compute_grads(loss_fn)
  local = num_shards // mesh.size
  split = PartitionSpec(mesh.axis_names)

  def body(params, data, indices, key_data):
    keys = jax.random.wrap_key_data(key_data, impl="threefry2x32")
    outs = []
    for j in range(local):  # Unrolled: each shard exactly as the per-shard function.
      outs.append(grad_fn(params, gather(data, indices[j]), keys[j]))
    return shards_lib.stack_shards([o[0] for o in outs]), shards_lib.stack_shards([o[1] for o in outs])

  return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(PartitionSpec(), PartitionSpec(), split, split),
                               out_specs=(split, split), check_vma=False))


def _psum_flat(arrays: list, axes):
  """``psum`` of `arrays` over the mesh axes as one collective per dtype (the
  arrays flattened and joined; XLA's CPU runtime may order independent
  collectives differently on each process, docs/protocol.md, "Many hosts")."""
  out = [None] * len(arrays)
  for dtype in dict.fromkeys(a.dtype for a in arrays):
    idx = [i for i, a in enumerate(arrays) if a.dtype == dtype]
    flat = jax.lax.psum(jax.numpy.concatenate([arrays[i].ravel() for i in idx]), axes)
    start = 0
    for i in idx:
      out[i] = flat[start:start + arrays[i].size].reshape(arrays[i].shape)
      start += arrays[i].size
  return out


def _placed(rows: jax.Array, num_shards: int, axes) -> jax.Array:
  """This device's `rows` (its local shards' values) at their place in an
  array of all `num_shards` shards, zeros elsewhere: a ``psum`` of it over the
  mesh gathers every shard's rows (adding zeros is exact)."""
  local = rows.shape[0]
  full = jax.numpy.zeros((num_shards, *rows.shape[1:]), rows.dtype)
  return jax.lax.dynamic_update_slice_in_dim(full, rows, jax.lax.axis_index(axes) * local, axis=0)


@functools.lru_cache(maxsize=32)
def _mesh_mean(mesh: Mesh, num_shards: int):
  """The jitted mean of shard gradients (leaves ``(S, ...)`` over the mesh),
  and their losses gathered: each device adds its local shards, one ``psum``
  adds the devices' sums over the mesh (with the losses, each at its place),
  the sums divided by S; both replicated over the mesh."""
  local = num_shards // mesh.size
  split = PartitionSpec(mesh.axis_names)
  axes = mesh.axis_names

  def body(grads, losses):
    leaves, treedef = jax.tree_util.tree_flatten(grads)
    totals = []
    for x in leaves:
      total = x[0]
      for j in range(1, local):
        total = total + x[j]
      totals.append(total)
    *sums, all_losses = _psum_flat([*totals, _placed(losses, num_shards, axes)], axes)
    mean = [t / jax.numpy.asarray(num_shards, t.dtype) for t in sums]
    return jax.tree_util.tree_unflatten(treedef, mean), all_losses

  return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(split, split),
                               out_specs=(PartitionSpec(), PartitionSpec()), check_vma=False))


@functools.lru_cache(maxsize=32)
def _projector(mesh: Mesh, num_shards: int):
  """The jitted shard_map that projects every local shard's gradient leaves
  with the (replicated) vectors: the ``(S, L)`` float32 scalars, gathered
  with one ``psum`` and replicated over the mesh."""
  local = num_shards // mesh.size
  split = PartitionSpec(mesh.axis_names)

  def body(leaves, vectors):
    rows = jax.numpy.stack([shards_lib.project_leaves([g[j] for g in leaves], vectors)
                            for j in range(local)])
    return jax.lax.psum(_placed(rows, num_shards, mesh.axis_names), mesh.axis_names)

  return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(split, PartitionSpec()),
                               out_specs=PartitionSpec(), check_vma=False))


class ShardedWorker:
  """Honest worker that computes S shards of each step data-parallel over a mesh.

  See the module docstring for exactly how it cuts the batch and computes.

  Args:
    model: the model (its pure `loss`).
    data: the worker's copy of the training set (any pytree of arrays with a
      leading example axis, or images and labels), replicated over the mesh
      once.
    num_shards: S, the trusted runtime's ``ProtocolConfig.num_shards``.
    mesh: a `jax.sharding.Mesh` of any devices (possibly spanning processes);
      its size must divide S. Default: `default_mesh(num_shards)` over
      `ginn_jax.worker_devices()`.
    shard_mode: the runtime's ``ProtocolConfig.shard_mode``: ``"per_shard"``
      (report every shard's gradient) or ``"aggregate"`` (report their mean,
      answer `project`); None: the same default as `ProtocolConfig`.

  Raises:
    ValueError: S not a positive int, or not a multiple of the mesh size.

  Attributes:
    mesh: the mesh.
    device: the mesh's first device.
    honest: with S = 1, the `HonestWorker` on `device` that answers every order.

  Example::

    rt = ginn.TrustedRuntime(model, x, y, ginn.ProtocolConfig(batch_size=64, num_shards=4))
    ginn.train(rt, ginn.ShardedWorker(model, x, y, num_shards=4), 100)
  """

  def __init__(self, model: Model, data: Any, labels: np.ndarray | None = None, *,
               num_shards: int, mesh: Mesh | None = None, shard_mode: str | None = None):
    shards_lib.check_num_shards(num_shards, num_shards)
    if callable(getattr(model, "frozen_params", None)):
      raise NotImplementedError(
          f"ShardedWorker does not support a model with frozen parameters ({model.name}, from "
          "ginn_jax.lora or ginn_jax.freeze) yet; fine-tune with num_shards=1 and an HonestWorker")
    self.model = model
    self.num_shards = int(num_shards)
    self.shard_mode = shards_lib.resolve_shard_mode(shard_mode, self.num_shards)
    self.aggregate = self.num_shards > 1 and self.shard_mode == shards_lib.AGGREGATE
    self._kept: tuple[int, Any] | None = None  # Aggregate: (step, shard gradients on the mesh).
    self.mesh = mesh if mesh is not None else default_mesh(self.num_shards)
    if self.num_shards % self.mesh.size:
      raise ValueError(
          f"num_shards={num_shards} is not a multiple of the mesh's {self.mesh.size} devices: every "
          f"device computes the same number of shards; use a mesh of a divisor of {num_shards} "
          "devices or another shard count")
    self.device = self.mesh.devices.flat[0]
    self.honest = None
    if self.num_shards == 1:
      self.honest = HonestWorker(model, data, labels, device=self.device)
      return
    self._replicated = NamedSharding(self.mesh, PartitionSpec())
    self._split = NamedSharding(self.mesh, PartitionSpec(self.mesh.axis_names))
    self.data = _put(as_training_data(data, labels), self._replicated)
    loss = model.loss
    self._fn = _sharded_grad(getattr(loss, "__self__", None), getattr(loss, "__func__", loss),
                             self.mesh, self.num_shards)
    self.witness_fn = None
    if self.device.process_index == jax.process_index():
      # The first device's copy of the replicated training set (no second copy).
      local = lambda a: next(sh.data for sh in a.addressable_shards if sh.device == self.device)  # noqa: E731
      self.witness_fn = DeviceWitnessFn(model.loss, jax.tree_util.tree_map(local, self.data), self.device)


  def compute(self, params, batch_indices, layer_key) -> tuple[jax.Array, object]:
    """``(losses (S,), grads with leaves (S, *param.shape))`` of one step,
    sharded over the mesh (S > 1)."""
    if self.honest is not None:
      raise ValueError("compute() is for S > 1; with one shard call the worker on the order")
    idx = shards_lib.shard_indices(np.asarray(batch_indices, np.int32), self.num_shards)
    key_data = jax.random.key_data(shards_lib.shard_keys(layer_key, self.num_shards))
    params = _put(params, self._replicated)
    idx, key_data = _put(idx, self._split), _put(key_data, self._split)
    with jax.default_matmul_precision("highest"):
      return self._fn(params, self.data, idx, key_data)

  def __call__(self, order: WorkOrder) -> GradientReport:
    if self.honest is not None:
      return self.honest(order)
    loss, grads = self.compute(order.params, order.batch_indices, order.layer_key)
    if self.aggregate:
      return self.aggregate_report(order.step, loss, grads)
    return GradientReport(step=order.step, grads=grads, loss=loss)

  def aggregate_report(self, step: int, losses, grads) -> GradientReport:
    """The ``"aggregate"`` report of shard gradients `grads` (leaves ``(S,
    *param.shape)`` over the mesh): their mean over the mesh (``psum``),
    replicated, and the losses; `grads` are kept for `project`."""
    self._kept = (step, grads)
    with jax.default_matmul_precision("highest"):
      mean, losses = _mesh_mean(self.mesh, self.num_shards)(grads, losses)
    # One device's copies of the replicated results (this process's first): what the trusted
    # side copies from (a copy from a sharding over S devices takes a slow path).
    return GradientReport(step=step, grads=jax.tree_util.tree_map(_first, mean), loss=_first(losses))

  def shard_grads(self, order: WorkOrder):
    """The S shard gradients of `order` (leaves ``(S, *param.shape)`` over the
    mesh): those kept from the last step if it was `order`'s, else computed
    again. Aggregate mode."""
    if self._kept is not None and self._kept[0] == order.step:
      return self._kept[1]
    return self.compute(order.params, order.batch_indices, order.layer_key)[1]

  def project(self, request: ProjectionRequest) -> Projections:
    """The answer to a projection challenge (``"aggregate"`` mode): ``values[s,
    l] = a_l^T G_{s,l} b_l`` of every shard's gradient, projected on the
    devices that hold it (an ``(S, L)`` array over the mesh).

    Raises:
      ValueError: the worker is not in ``"aggregate"`` mode.
    """
    if not self.aggregate:
      raise ValueError(f"a projection challenge needs an 'aggregate' worker (this one is "
                       f"{self.shard_mode!r} with {self.num_shards} shard(s))")
    return Projections(step=request.step, values=self.project_grads(self.shard_grads(request.order),
                                                                    request.vectors))

  def project_grads(self, grads, vectors) -> jax.Array:
    """``(S, L)`` projections of shard gradients `grads` (a pytree with leaves
    ``(S, *param.shape)`` over the mesh) with `vectors`, on this process's
    first mesh device."""
    leaves = jax.tree_util.tree_leaves(grads)
    vectors = _put(tuple(vectors), self._replicated)
    with jax.default_matmul_precision("highest"):
      return _first(_projector(self.mesh, self.num_shards)(leaves, vectors))

  def witness(self, request: WitnessRequest) -> Witness:
    """The witness of the requested step (one shard: as `HonestWorker`); with
    S > 1, of the requested shard (``request.shard``): its sub-batch and key,
    computed again on `device` from the order.

    Raises:
      ValueError: the mesh's first device is not in this process, or a
        sharded request without a shard.
    """
    if self.honest is not None:
      return self.honest.witness(request)
    if self.witness_fn is None:
      raise ValueError(f"model {self.model.name!r} has no witness on this worker (the mesh's first "
                       "device is not in this process)")
    s = request.shard
    if s is None or not 0 <= s < self.num_shards:
      raise ValueError(f"a witness request of a {self.num_shards}-shard run must name a shard, got {s!r}")
    order = request.order
    idx = shards_lib.shard_indices(np.asarray(order.batch_indices, np.int32), self.num_shards)[s]
    _, _, outputs, input_grads = self.witness_fn(order.params, idx,
                                                 shards_lib.shard_key(order.layer_key, s))
    return Witness(step=request.step, outputs=outputs, input_grads=input_grads)

