"""Many hosts: a run whose worker spans the processes of `jax.distributed`.

Process 0 hosts the trusted runtime (on its CPU device, `trusted_device()`)
and drives the run with `train_multihost`; every other process runs `follow`
until process 0 says the run is over. Both sides wrap the same
`MultiHostWorker` (worker/multihost.py), the only code that talks between
processes, through JAX's own collectives.

Which devices: the worker mesh (`global_worker_mesh`) is, in process order,
every device of the default backend of every process, except that on a
CPU-only run each process keeps its first CPU device out of it (as
`ginn_jax.worker_devices` does in one process). Process 0's ``cpu:0`` is then
the trusted device and only that: no shard is computed where the runtime
computes. The cost is one idle CPU device on each other process (two CPU
devices per process give a mesh of one device per process). On accelerators
nothing is lost: the mesh is every accelerator, the trusted device is process
0's CPU.

Agreement: before the first work order, every process calls
`check_agreement` with its own model, data and config. Each posts the fields
of `agreement_fields` to the key-value store of `jax.distributed` (one record
per process, no collective: a process that never arrives is a timeout, not a
hang) and compares the others' field by field, so a run started with
different settings is a `ProcessDisagreement` on every process, naming each
field and both values, instead of a collective of mismatched shapes that hangs
or a silent mix.

Deadlines (docs/protocol.md, "Many hosts"): see `initialize`.
"""
from __future__ import annotations

import itertools
import json
import warnings
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from ginn_jax._src import errors
from ginn_jax._src.loop import TrainResult, train
from ginn_jax._src.shards import SHARD_AXIS
from ginn_jax._src.trusted.runtime import TrustedRuntime
from ginn_jax._src.worker.multihost import FollowResult, MultiHostWorker


def initialize(coordinator_address: str, num_processes: int, process_id: int, *,
               local_device_ids: list[int] | None = None, timeout_s: int = 300,
               heartbeat_timeout_s: int = 100) -> None:
  """Joins this process to a multi-process run (`jax.distributed.initialize`),
  with CPU collectives over gloo. Call it before anything else touches JAX.

  Deadlines of a failure (docs/protocol.md, "Many hosts"; the processes run
  `train_multihost` and `follow`):

  * a follower that dies: process 0's pending collective fails as soon as
    the follower's connection closes (seconds), and at the latest
    `heartbeat_timeout_s` after its last heartbeat `jax.distributed` ends
    process 0 with an error;
  * process 0 raising inside a step (an error, an interrupt; in a notebook
    too, where it lives on): every follower exits with
    ``MultiHostWorker.ABORT_EXIT_CODE`` (5) and process 0's error on stderr
    within about a second (it polls the abort key every 0.5 s); process 0
    raising between steps: the followers return from `follow` with HALT;
  * process 0 that dies: the followers' collectives fail as soon as its
    connections close, and `heartbeat_timeout_s` after its last heartbeat
    at the latest, `jax.distributed` ends them with an error;
  * a process that does not join, or does not reach `check_agreement`:
    an error after `timeout_s`.

  Args:
    coordinator_address: ``HOST:PORT`` of process 0 (it listens there).
    num_processes: processes in the run.
    process_id: this process, 0 .. num_processes - 1 (0 hosts the trusted runtime).
    local_device_ids: the local devices this process may use (default: all).
    timeout_s: how long to wait for every process to join (and, at shutdown,
      for every process to leave).
    heartbeat_timeout_s: a process silent this long counts as dead, and the
      others stop with an error instead of waiting for it.

  Raises:
    ValueError: the process id or count is out of range.
  """
  if not (isinstance(num_processes, int) and num_processes >= 1):
    raise ValueError(f"num_processes must be a positive int, got {num_processes!r}")
  if not (isinstance(process_id, int) and 0 <= process_id < num_processes):
    raise ValueError(f"process_id must be in 0..{num_processes - 1}, got {process_id!r}")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id, local_device_ids=local_device_ids,
                             initialization_timeout=timeout_s,
                             heartbeat_timeout_seconds=heartbeat_timeout_s,
                             shutdown_timeout_seconds=timeout_s)


_AGREEMENTS = itertools.count()  # Every process checks agreement in the same order.
AGREEMENT_TIMEOUT_S = 300.0


def agreement_fields(model, data: Any, config) -> dict[str, Any]:
  """What every process of a run must agree on (`check_agreement`), as JSON
  values: the model (name, input shape, digest of its parameters' shapes and
  dtypes), the training set's `dataset_digest`, ``batch_size``,
  ``num_shards`` (S), ``shard_mode``, every other `ProtocolConfig` field (as
  ``config.NAME``), the versions of ginn_jax, jax and jaxlib, and with
  ``p_witness > 0`` the digest of the witness plan.

  Args:
    model: the run's model.
    data: the training set (any pytree with a leading example axis, or a
      `Batch` / ``(images, labels)``).
    config: the run's `ProtocolConfig`.
  """
  import hashlib

  import jaxlib

  import ginn_jax
  from ginn_jax._src.data import as_training_data, dataset_digest
  from ginn_jax._src.step import step_program

  data = as_training_data(data)
  params = jax.eval_shape(model.init, jax.eval_shape(lambda: jax.random.key(0)))
  shapes = json.dumps([[list(p.shape), str(p.dtype)] for p in jax.tree_util.tree_leaves(params)])
  cfg = config.to_dict()
  fields = {
      "model": model.name,
      "input_shape": (None if getattr(model, "input_shape", None) is None
                      else list(model.input_shape)),
      "model_parameters": hashlib.sha256(shapes.encode()).hexdigest()[:16],
      "dataset_digest": dataset_digest(data),
      "batch_size": config.batch_size,
      "num_shards": config.num_shards,
      "shard_mode": getattr(config, "shard_mode", "per_shard"),
      **{f"config.{k}": v for k, v in cfg.items()
         if k not in ("batch_size", "num_shards", "shard_mode")},
      "ginn_jax_version": ginn_jax.__version__,
      "jax_version": jax.__version__,
      "jaxlib_version": jaxlib.__version__,
      "witness_plan": (step_program(model.loss, params, data,
                                    config.batch_size // config.num_shards).plan.digest
                       if config.p_witness > 0 else None),
  }
  return json.loads(json.dumps(fields))  # As the other processes will read them.


def check_agreement(model, data: Any, config, *,
                    timeout_s: float = AGREEMENT_TIMEOUT_S) -> dict[str, Any]:
  """Checks that every process of the run was started with the same
  settings (`agreement_fields`). Every process must call it, in the same
  order with respect to its other calls of it, before the run's first work
  order (the `ginn train` command does).

  Args:
    model, data, config: this process's model, training set and `ProtocolConfig`.
    timeout_s: how long to wait for the other processes' settings.

  Returns:
    This process's fields (all processes agree on them).

  Raises:
    ProcessDisagreement: on every process, if any field differs between any two
      processes (the message names each field and both values), or if a
      process sent nothing within `timeout_s`.
  """
  from jax._src import distributed as jax_distributed

  fields = agreement_fields(model, data, config)
  client = jax_distributed.global_state.client
  if client is None or jax.process_count() == 1:
    return fields
  me, n = jax.process_index(), next(_AGREEMENTS)
  client.key_value_set(f"ginn_jax/agreement/{n}/{me}", json.dumps(fields, sort_keys=True))
  differences = []
  for other in range(jax.process_count()):
    if other == me:
      continue
    try:
      theirs = json.loads(client.blocking_key_value_get(f"ginn_jax/agreement/{n}/{other}",
                                                        int(timeout_s * 1000)))
    except Exception as e:  # noqa: BLE001  (jax's runtime error: a timeout, a lost coordinator.)
      raise errors.ProcessDisagreement(
          f"process {me}: process {other} sent no settings to agree on within {timeout_s:g} s "
          f"(is it running the same code, and did it start?): {str(e).splitlines()[0]}",
          [("*", None, other, None)]) from None
    for name in sorted(set(fields) | set(theirs)):
      if fields.get(name) != theirs.get(name):
        differences.append((name, fields.get(name), other, theirs.get(name)))
  if differences:
    said = "; ".join(f"{name}: {mine!r} here, {theirs!r} on process {other}"
                     for name, mine, other, theirs in differences)
    raise errors.ProcessDisagreement(
        f"process {me}: the processes of this run were started with different settings "
        f"({said}); start every process with the same model, data and settings", differences)
  return fields


def shutdown() -> None:
  """Leaves the run (`jax.distributed.shutdown`: waits for the other processes)."""
  jax.distributed.shutdown()


def global_worker_mesh(axis_name: str = SHARD_AXIS, *, process: int | None = None) -> Mesh:
  """The worker's 1-D mesh over the devices of every process (module docstring):
  every device of the default backend, in process order, less each process's
  first CPU device on a CPU-only run (unless it is that process's only one).

  Args:
    axis_name: the mesh axis.
    process: only that process's devices of the mesh: a mesh it computes on
      alone, with no collective (e.g. to calibrate a tolerance on process 0
      while the others wait).
  """
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  if devices[0].platform == "cpu":
    first: dict[int, jax.Device] = {}
    count: dict[int, int] = {}
    for d in devices:
      first.setdefault(d.process_index, d)
      count[d.process_index] = count.get(d.process_index, 0) + 1
    devices = [d for d in devices if d is not first[d.process_index] or count[d.process_index] == 1]
    if count.get(0) == 1:
      warnings.warn(
          "process 0 has one CPU device: the trusted device also computes shards of the worker. "
          "Set XLA_FLAGS=--xla_force_host_platform_device_count=2 (or more) on every process.",
          RuntimeWarning, stacklevel=2)
  if process is not None:
    devices = [d for d in devices if d.process_index == process]
  return Mesh(np.array(devices), (axis_name,))


def train_multihost(runtime: TrustedRuntime, worker: MultiHostWorker, num_steps: int,
                    **kwargs) -> TrainResult:
  """`ginn_jax.train` on process 0 of a multi-process run, then tells the
  followers to stop: STOP after a normal end, HALT on any exception
  (an integrity violation, a rejected report, anything else); an exception
  inside a step makes the followers exit instead (`initialize`). Call
  `check_agreement` on every process first. For a run directory (checkpoints,
  resume), pass the worker to `ginn_jax.run_verified` inside ``with worker:``.

  Args:
    runtime: the trusted runtime (on this process).
    worker: the `MultiHostWorker` every process built.
    num_steps, kwargs: as for `ginn_jax.train`.

  Raises:
    Whatever `ginn_jax.train` raises.
  """
  with worker:
    return train(runtime, worker, num_steps, **kwargs)


def follow(worker: MultiHostWorker) -> FollowResult:
  """The loop of a process other than 0: compute every work order process 0
  broadcasts, until it says the run stopped or halted."""
  return worker.follow()
