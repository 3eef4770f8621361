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
"""
from __future__ import annotations

import warnings

import jax
import numpy as np
from jax.sharding import Mesh

from ginn_jax._src.loop import TrainResult, train
from ginn_jax._src.shards import SHARD_AXIS
from ginn_jax._src.trusted.runtime import TrustedRuntime
from ginn_jax._src.worker.multihost import FollowResult, MultiHostWorker


def initialize(coordinator_address: str, num_processes: int, process_id: int, *,
               local_device_ids: list[int] | None = None, timeout_s: int = 300,
               heartbeat_timeout_s: int = 100) -> None:
  """Joins this process to a multi-process run (`jax.distributed.initialize`),
  with CPU collectives over gloo. Call it before anything else touches JAX.

  Args:
    coordinator_address: ``HOST:PORT`` of process 0 (it listens there).
    num_processes: processes in the run.
    process_id: this process, 0 .. num_processes - 1 (0 hosts the trusted runtime).
    local_device_ids: the local devices this process may use (default: all).
    timeout_s: how long to wait for every process to join.
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
  (an integrity violation, a rejected report, anything else).

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
