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
      rt.submit(report, witness=worker.witness)
        (a shard drawn for a witness check: its witness computed on process 0 alone)

    on leaving `with worker:`  broadcast STOP (clean end) or HALT (an error)
    an error inside a step    ───▶  the abort key (below): every follower exits

In ``"aggregate"`` mode (docs/design.md section 11.2) the report's gradient is
the shards' mean, replicated over the mesh (each process already holds it:
nothing to gather but the losses), and the projection challenge is one more
exchange of the step::

      rt.submit(...) asks worker.project(request)
      broadcast_one_to_all(PROJECT, vectors) ───▶  the same vectors
      inner.project(...)  ─── each process projects its own shards ───  inner.project(...)
      process_allgather(scalars)          ◀───  (its shards' rows)

The trusted runtime sees only the `WorkOrder` it hands to `__call__` and the
`GradientReport` it gets back; the collectives are worker code.

Each message is one flat byte array, so that each exchange is exactly one
collective. (A pytree would be one collective per leaf inside one program, and
XLA's CPU runtime may run independent collectives in a different order on
each process: gloo then pairs the wrong buffers and aborts.) Bytes also keep
the broadcast exact: it is a sum with the zeros of the other processes, exact
on integers, where a float sum would turn -0.0 into +0.0.

Failures (docs/protocol.md, "Many hosts"). An error on process 0 between steps
is a HALT broadcast. An error on process 0 inside a step (its part of the
step's collectives raised, or it was interrupted there) leaves the followers
inside a collective that process 0 will never join, and a collective cannot be
cancelled. So process 0 then writes the step and its error to the abort key in
the key-value store of `jax.distributed` (a gRPC call to the coordination
service, no collective), and each follower watches that key from a thread of
its own while it follows: it polls every `ABORT_POLL_S` seconds, and when the
key appears it prints process 0's error and exits the process with
`ABORT_EXIT_CODE`. This does not wait for process 0 to exit: in a notebook
its kernel stays up after the error (until `jax.distributed`, missing the
followers, ends it within its heartbeat timeout: a run that lost a process is
over). A process that dies (process 0 included) closes its gloo connections:
the others' collectives fail at once, and `jax.distributed`'s heartbeat ends
any process left waiting within its heartbeat timeout. The abort key is
numbered by worker: every process must build its `MultiHostWorker`s in the
same order.
"""
from __future__ import annotations

import dataclasses
import enum
import itertools
import os
import sys
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from ginn_jax._src import shards as shards_lib
from ginn_jax._src.boundary import (GradientReport, ProjectionRequest, Projections, Witness,
                                    WitnessRequest, WorkOrder)
from ginn_jax._src.worker.honest import Worker


ABORT_POLL_S = 0.5  # How often a follower looks at the abort key.
ABORT_EXIT_CODE = 5  # A follower's exit code when process 0 failed inside a step.
_WORKERS = itertools.count()  # Every process builds its workers in the same order.


def _kv_client():
  """The `jax.distributed` client (its key-value store), None outside a
  multi-process run."""
  from jax._src import distributed
  return distributed.global_state.client


class Command(enum.IntEnum):
  """The header of every message process 0 broadcasts."""

  STEP = 1  # A work order follows: compute it and send the report back.
  STOP = 2  # The run ended normally.
  HALT = 3  # The run ended on an error (violation, rejected report, exception).
  PROJECT = 4  # Projection vectors follow (aggregate mode): project the last step's shards.


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


class _Layout:
  """Where each array of a message lies in one flat byte buffer."""

  def __init__(self, specs: list[tuple[tuple[int, ...], np.dtype]]):
    self.specs = [(tuple(shape), np.dtype(dtype)) for shape, dtype in specs]
    self.offsets, n = [], 0
    for shape, dtype in self.specs:
      self.offsets.append(n)
      n += -(-int(np.prod(shape, dtype=np.int64)) * dtype.itemsize // 8) * 8  # 8-byte aligned.
    self.nbytes = n

  def pack(self, arrays: list[np.ndarray]) -> np.ndarray:
    buf = np.zeros(self.nbytes, np.uint8)
    for a, (shape, dtype), off in zip(arrays, self.specs, self.offsets):
      a = np.ascontiguousarray(a, dtype=dtype)
      if a.shape != shape:
        raise ValueError(f"message array of shape {a.shape}, expected {shape}")
      buf[off:off + a.nbytes] = a.reshape(-1).view(np.uint8)
    return buf

  def unpack(self, buf: np.ndarray) -> list[np.ndarray]:
    return [np.frombuffer(buf, dtype, int(np.prod(shape, dtype=np.int64)), off).reshape(shape).copy()
            for (shape, dtype), off in zip(self.specs, self.offsets)]


def _pack_rows(leaves):
  """Every leaf (leading shard axis S) as bytes, side by side: one ``(S, n)``
  uint8 array, each row one shard's bytes."""
  return jax.numpy.concatenate(
      [jax.lax.bitcast_convert_type(x, jax.numpy.uint8).reshape(x.shape[0], -1) for x in leaves],
      axis=1)


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

      ginn_jax.check_agreement(model, data, cfg)  # Every process, first.
      worker = MultiHostWorker(inner, batch_size=cfg.batch_size)
      if jax.process_index() == 0:
        with worker:
          result = ginn_jax.train(runtime, worker, num_steps)
      else:
        worker.follow()
  """

  ABORT_EXIT_CODE = ABORT_EXIT_CODE
  ABORT_POLL_S = ABORT_POLL_S

  def __init__(self, inner: Worker, *, batch_size: int):
    self.inner = inner
    self.mesh = inner.mesh
    self.batch_size = batch_size
    params = jax.eval_shape(lambda: inner.model.init(jax.random.key(0)))
    self._params_def = jax.tree_util.tree_structure(params)
    key_shape = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape
    # header (command, step) | every parameter leaf | batch indices | layer key data
    self._layout = _Layout([((2,), np.int32),
                            *((p.shape, p.dtype) for p in jax.tree_util.tree_leaves(params)),
                            ((batch_size,), np.int32), (key_shape, np.uint32)])
    # header (command, step) | a_l, b_l of every leaf: a projection challenge (aggregate mode).
    self._vectors = _Layout([((2,), np.int32), *(((n,), np.float32)
                                                 for p in jax.tree_util.tree_leaves(params)
                                                 for n in shards_lib.matrix_shape(p.shape))])
    self._nbytes = max(self._layout.nbytes, self._vectors.nbytes)  # Every broadcast's size.
    self._last_order: WorkOrder | None = None
    here = [d for d in self.mesh.devices.flat if d.process_index == jax.process_index()]
    if not here:
      raise ValueError(f"the worker mesh has no device of process {jax.process_index()}: every "
                       "process of the run must compute shards (use ginn_jax.global_worker_mesh())")
    self._device = here[0]  # Where this process's copy of the order's key lives.
    self._wrap = jax.jit(jax.random.wrap_key_data)
    self._pack = jax.jit(_pack_rows, out_shardings=NamedSharding(
        self.mesh, PartitionSpec(self.mesh.axis_names)))
    self._in_step = False
    self._stopped = False
    self.steps = 0
    # The key process 0 writes when it fails inside a step (module docstring).
    self.abort_key = f"ginn_jax/multihost/{next(_WORKERS)}/abort"

  # -- process 0 ---------------------------------------------------------------

  def __call__(self, order: WorkOrder) -> GradientReport:
    """Sends `order` to every process, computes it together with them, and
    returns the whole report (host arrays) on process 0."""
    if jax.process_index() != 0:
      raise RuntimeError(f"process {jax.process_index()} is a follower: call follow(), not the "
                         "worker (work orders come from process 0)")
    if self._stopped:
      raise RuntimeError("the followers were told to stop; start a new run")
    params = jax.device_get(jax.tree_util.tree_leaves(order.params))
    key = jax.device_get(jax.random.key_data(order.layer_key))
    message = self._layout.pack([np.array([Command.STEP, order.step], np.int32), *params,
                                 order.batch_indices, key])
    self._in_step = True
    try:
      return self._step(self._broadcast(self._padded(message)))
    except BaseException as e:  # An interrupt too: the followers are inside this step.
      self._abort(order.step, e)
      raise

  def project(self, request: ProjectionRequest) -> Projections:
    """The answer to a projection challenge (``"aggregate"`` mode): the
    vectors sent to every process, each projects the shards its devices
    computed for the last step, the ``(S, L)`` scalars gathered (one
    broadcast, one all-gather).

    Raises:
      ValueError: the inner worker gives no projections.
    """
    if jax.process_index() != 0:
      raise RuntimeError("projection challenges come from the trusted runtime, on process 0")
    if self._stopped:
      raise RuntimeError("the followers were told to stop; start a new run")
    if getattr(self.inner, "project", None) is None:
      raise ValueError(f"the inner worker {type(self.inner).__name__} gives no projections; use "
                       "shard_mode='per_shard' or an aggregate ShardedWorker")
    vectors = [np.asarray(v, np.float32) for pair in jax.device_get(tuple(request.vectors)) for v in pair]
    message = self._vectors.pack([np.array([Command.PROJECT, request.step], np.int32), *vectors])
    self._in_step = True
    try:
      return self._project(self._broadcast(self._padded(message)))
    except BaseException as e:  # As in a step: the followers are inside this exchange.
      self._abort(request.step, e)
      raise

  def witness(self, request: WitnessRequest) -> Witness:
    """The witness of a shard drawn for a witness check: the inner worker's,
    on process 0 alone (a `ShardedWorker` computes it again from the order on
    its mesh's first device, which is process 0's), with no collective: the
    followers are not involved, whichever process computed that shard.

    Raises:
      ValueError: the inner worker gives no witnesses.
    """
    if jax.process_index() != 0:
      raise RuntimeError("witness requests come from the trusted runtime, on process 0")
    answer = getattr(self.inner, "witness", None)
    if answer is None:
      raise ValueError(f"the inner worker {type(self.inner).__name__} gives no witnesses; use "
                       "re-computation checks (p) only")
    return answer(request)

  def stop(self, *, halted: bool = False) -> None:
    """Tells the followers the run is over (STOP, or HALT after an error).
    Once only; later calls do nothing."""
    if jax.process_index() != 0 or self._stopped:
      return  # Stopped already, or aborted inside a step (`_abort`).
    self._stopped = True
    command = Command.HALT if halted else Command.STOP
    message = np.zeros(self._nbytes, np.uint8)
    message[:8] = np.array([command, -1], np.int32).view(np.uint8)
    self._broadcast(message)

  def _abort(self, step: int, error: BaseException) -> None:
    """Process 0 failed inside `step`: the followers wait in that step's
    collectives, where a broadcast cannot reach them. Writes the abort key
    (module docstring), which makes each of them exit; this worker is stopped."""
    self._stopped = True
    client = _kv_client()
    if client is None or jax.process_count() == 1:
      return
    try:
      client.key_value_set(self.abort_key, f"step {step}: {type(error).__name__}: {error}"[:2000])
    except Exception:  # noqa: BLE001  (The coordination service is gone: so are the followers.)
      pass

  def __enter__(self) -> MultiHostWorker:
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    self.stop(halted=exc_type is not None)

  # -- processes 1.. -----------------------------------------------------------

  def follow(self) -> FollowResult:
    """Takes work orders from process 0 until it says STOP or HALT.

    While it follows, a thread watches the abort key: if process 0 fails
    inside a step, this process prints process 0's error to stderr and exits
    with `ABORT_EXIT_CODE` within about `ABORT_POLL_S` seconds (module
    docstring), instead of waiting in that step's collective forever.
    """
    if jax.process_index() == 0:
      raise RuntimeError("process 0 hosts the trusted runtime: it sends work orders, it does "
                         "not follow")
    watch = _AbortWatch(self.abort_key)
    try:
      while True:
        message = self._broadcast(np.zeros(self._nbytes, np.uint8))
        command = Command(int(message[:8].view(np.int32)[0]))
        if command == Command.PROJECT:
          self._project(message)
          continue
        if command != Command.STEP:
          return FollowResult(command=command, steps=self.steps)
        self._step(message)
    finally:
      watch.stop()

  # -- both --------------------------------------------------------------------

  def _padded(self, message: np.ndarray) -> np.ndarray:
    """`message` padded with zeros to the size every broadcast has."""
    return np.concatenate([message, np.zeros(self._nbytes - message.size, np.uint8)])

  def _project(self, message: np.ndarray) -> Projections:
    """The projection challenge in `message`, answered by the inner worker
    for the last step's shards; the scalars gathered (every process gets a copy)."""
    header, *flat = self._vectors.unpack(message)
    vectors = tuple(zip(flat[0::2], flat[1::2]))
    step = int(header[1])
    answer = self.inner.project(ProjectionRequest(step=step, order=self._last_order, vectors=vectors))
    (values,) = self._gather((answer.values,))
    self._in_step = False
    return Projections(step=answer.step, values=values)

  def _broadcast(self, message: np.ndarray) -> np.ndarray:
    """Process 0's `message` (flat bytes), on every process: one all-reduce."""
    # multihost_utils moves host arrays onto the devices without device_put:
    # the transfer is meant, so a transfer guard must not stop it.
    with jax.transfer_guard("allow"):
      return np.asarray(multihost_utils.broadcast_one_to_all(message))

  def _step(self, message: np.ndarray) -> GradientReport:
    """The order in `message`, computed by the inner worker over the global
    mesh; its report gathered (every process gets a copy)."""
    header, *params, indices, key_data = self._layout.unpack(message)
    order = WorkOrder(step=int(header[1]),
                      params=jax.tree_util.tree_unflatten(self._params_def, params),
                      batch_indices=indices,
                      layer_key=self._wrap(jax.device_put(key_data, self._device)))
    self._last_order = order
    report = self.inner(order)
    grads, loss = self._gather((report.grads, report.loss))
    self.steps += 1
    self._in_step = False
    return GradientReport(step=report.step, grads=grads, loss=loss)

  def _gather(self, tree):
    """`tree` (leaves with a leading shard axis over the mesh, or replicated
    over it) as host arrays on every process: a replicated leaf (an
    aggregate report's mean) is this process's own copy; the others are
    packed into one ``(S, bytes)`` array, one all-gather."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    if all(not isinstance(x, jax.Array) or x.is_fully_addressable for x in leaves):
      return jax.tree_util.tree_unflatten(treedef, [np.asarray(x) for x in jax.device_get(leaves)])
    out = [np.asarray(jax.device_get(x.addressable_data(0))) if x.sharding.is_fully_replicated else None
           for x in leaves]
    split = [x for x, o in zip(leaves, out) if o is None]
    if split:
      rows = self._pack(split)
      with jax.transfer_guard("allow"):  # As in `_broadcast`.
        host = np.asarray(multihost_utils.process_allgather(rows, tiled=True))
      start = 0
      for j, x in enumerate(leaves):
        if out[j] is not None:
          continue
        n = int(np.prod(x.shape[1:], dtype=np.int64)) * np.dtype(x.dtype).itemsize
        block = np.ascontiguousarray(host[:, start:start + n])
        out[j] = block.view(np.dtype(x.dtype)).reshape(x.shape)
        start += n
    return jax.tree_util.tree_unflatten(treedef, out)


class _AbortWatch:
  """A follower's watch on the abort key (module docstring): a daemon thread
  that polls the key every `ABORT_POLL_S` seconds until `stop`, and ends the
  process with `ABORT_EXIT_CODE` when process 0 writes it."""

  def __init__(self, key: str):
    self._key = key
    self._client = _kv_client()
    self._done = threading.Event()
    self._thread = None
    if self._client is not None and jax.process_count() > 1:
      self._thread = threading.Thread(target=self._run, name="ginn-abort-watch", daemon=True)
      self._thread.start()

  def _run(self) -> None:
    while not self._done.wait(ABORT_POLL_S):
      try:
        error = self._client.key_value_try_get(self._key)
      except Exception:  # noqa: BLE001  (Not written yet; a lost coordinator is the heartbeat's.)
        continue
      if self._done.is_set():
        return
      print(f"ginn_jax: process {jax.process_index()}: process 0 failed inside {error}; this "
            f"process cannot leave that step's collective, so it exits (code {ABORT_EXIT_CODE})",
            file=sys.stderr, flush=True)
      os._exit(ABORT_EXIT_CODE)

  def stop(self) -> None:
    self._done.set()
    if self._thread is not None:
      self._thread.join()
