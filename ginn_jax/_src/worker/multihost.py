"""One worker over the devices of several processes (docs/protocol.md, "Many hosts").

Every process of a `jax.distributed` run builds the same `MultiHostWorker`
around its own sharded worker over the global mesh. Process 0, which hosts the
trusted runtime, calls it like any worker; the other processes call
`MultiHostWorker.follow`. One step is three collectives, all from
`jax.experimental.multihost_utils`::

    process 0 (runtime + worker)              process i > 0 (follower)
      order = rt.next_order()
      broadcast_one_to_all(STEP, order)  ───▶  the same order, byte for byte
      inner(order)  ─── one jitted computation over the global mesh ───  inner(order)
      process_allgather(report)          ◀───  (its shards of the report)
      rt.submit(report)

    on leaving `with worker:`  broadcast STOP (clean end) or HALT (an error)

The trusted runtime sees only the `WorkOrder` it hands to `__call__` and the
`GradientReport` it gets back; the collectives are worker code. The order goes
out as raw bits (floats viewed as unsigned integers: the broadcast is a sum
with zeros from the other processes, exact on integers where a float sum would
turn -0.0 into +0.0).
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from ginn_jax._src.boundary import GradientReport, WorkOrder
from ginn_jax._src.worker.honest import Worker


class Command(enum.IntEnum):
  """The header of every message process 0 broadcasts."""

  STEP = 1  # A work order follows: compute it and send the report back.
  STOP = 2  # The run ended normally.
  HALT = 3  # The run ended on an error (violation, rejected report, exception).


@dataclasses.dataclass(frozen=True)
class FollowResult:
  """How a follower's loop ended.

  Attributes:
    command: `Command.STOP` or `Command.HALT`.
    steps: work orders this process computed.
  """

  command: Command
  steps: int

  @property
  def halted(self) -> bool:
    return self.command == Command.HALT


_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _bits(x: np.ndarray) -> np.ndarray:
  x = np.ascontiguousarray(x)
  return x.view(_UINT[x.dtype.itemsize])


class MultiHostWorker:
  """A sharded worker spread over the processes of a `jax.distributed` run.

  Args:
    inner: this process's worker over the global mesh (its ``mesh`` attribute
      spans the devices of every process), for example
      ``ginn_jax.ShardedWorker(model, images, labels, mesh=ginn_jax.global_worker_mesh())``.
      Called on every process with the same order, built from the broadcast
      bits: host (numpy) parameters and indices, and the layer key on this
      process's first mesh device; its report's leaves are global arrays over
      the mesh. A compromised process may pass a different one.
    batch_size: the run's batch size (followers need the shape of the order
      before it arrives).

  Use it as a context manager on process 0, so that the followers are told to
  stop whatever happens, and call `follow` on the others (or use
  `ginn_jax.train_multihost` and `ginn_jax.follow`)::

      worker = MultiHostWorker(inner, batch_size=cfg.batch_size)
      if jax.process_index() == 0:
        with worker:
          result = ginn_jax.train(runtime, worker, num_steps)
      else:
        worker.follow()
  """

  def __init__(self, inner: Worker, *, batch_size: int):
    self.inner = inner
    self.mesh = inner.mesh
    self.batch_size = batch_size
    params = jax.eval_shape(lambda: inner.model.init(jax.random.key(0)))
    self._params_def = jax.tree_util.tree_structure(params)
    self._params_dtypes = [np.dtype(p.dtype) for p in jax.tree_util.tree_leaves(params)]
    self._template = {
        "header": np.zeros(2, np.int32),
        "params": [np.zeros(p.shape, _UINT[np.dtype(p.dtype).itemsize])
                   for p in jax.tree_util.tree_leaves(params)],
        "indices": np.zeros(batch_size, np.int32),
        "key": np.zeros(jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape,
                        np.uint32),
    }
    here = [d for d in self.mesh.devices.flat if d.process_index == jax.process_index()]
    if not here:
      raise ValueError(f"the worker mesh has no device of process {jax.process_index()}: every "
                       "process of the run must compute shards (use ginn_jax.global_worker_mesh())")
    self._device = here[0]  # Where this process's copy of the order's key lives.
    self._wrap = jax.jit(jax.random.wrap_key_data)
    self._in_step = False
    self._stopped = False
    self.steps = 0

  # -- process 0 ---------------------------------------------------------------

  def __call__(self, order: WorkOrder) -> GradientReport:
    """Sends `order` to every process, computes it together with them, and
    returns the whole report (host arrays) on process 0."""
    if jax.process_index() != 0:
      raise RuntimeError(f"process {jax.process_index()} is a follower: call follow(), not the "
                         "worker (work orders come from process 0)")
    if self._stopped:
      raise RuntimeError("the followers were told to stop; start a new run")
    params = [np.asarray(p) for p in jax.device_get(jax.tree_util.tree_leaves(order.params))]
    message = {
        "header": np.array([Command.STEP, order.step], np.int32),
        "params": [_bits(p) for p in params],
        "indices": np.asarray(order.batch_indices, np.int32),
        "key": np.asarray(jax.device_get(jax.random.key_data(order.layer_key)), np.uint32),
    }
    self._in_step = True
    return self._step(self._broadcast(message))

  def stop(self, *, halted: bool = False) -> None:
    """Tells the followers the run is over (STOP, or HALT after an error).
    Once only; later calls do nothing."""
    if jax.process_index() != 0 or self._stopped:
      return
    self._stopped = True
    if self._in_step:
      # A failure inside a step's collectives: the followers are still in that
      # step, and a broadcast now would not match theirs. Leave them to the
      # heartbeat timeout of `jax.distributed` (an error there, not a hang).
      return
    command = Command.HALT if halted else Command.STOP
    self._broadcast({**self._template, "header": np.array([command, -1], np.int32)})

  def __enter__(self) -> MultiHostWorker:
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    self.stop(halted=exc_type is not None)

  # -- processes 1.. -----------------------------------------------------------

  def follow(self) -> FollowResult:
    """Takes work orders from process 0 until it says STOP or HALT."""
    if jax.process_index() == 0:
      raise RuntimeError("process 0 hosts the trusted runtime: it sends work orders, it does "
                         "not follow")
    while True:
      message = self._broadcast(self._template)
      command = Command(int(message["header"][0]))
      if command != Command.STEP:
        return FollowResult(command=command, steps=self.steps)
      self._step(message)

  # -- both --------------------------------------------------------------------

  def _broadcast(self, message: dict[str, Any]) -> dict[str, Any]:
    # multihost_utils moves host arrays onto the devices without device_put:
    # the transfer is meant, so a transfer guard must not stop it.
    with jax.transfer_guard("allow"):
      return multihost_utils.broadcast_one_to_all(message)

  def _step(self, message: dict[str, Any]) -> GradientReport:
    """The order in `message`, computed by the inner worker over the global
    mesh; its report gathered (every process gets a copy)."""
    params = [bits.view(dtype) for bits, dtype in zip(message["params"], self._params_dtypes)]
    key = self._wrap(jax.device_put(message["key"], self._device))
    order = WorkOrder(step=int(message["header"][1]),
                      params=jax.tree_util.tree_unflatten(self._params_def, params),
                      batch_indices=np.asarray(message["indices"]), layer_key=key)
    report = self.inner(order)
    with jax.transfer_guard("allow"):  # As in `_broadcast`.
      grads, loss = multihost_utils.process_allgather((report.grads, report.loss), tiled=True)
    self.steps += 1
    self._in_step = False
    return GradientReport(step=report.step, grads=grads, loss=loss)
