"""Which device is trusted and which one runs the untrusted worker."""
from __future__ import annotations

import warnings

import jax


def trusted_device() -> jax.Device:
  """The CPU device that stands in for the TEE (always ``cpu:0``)."""
  return jax.devices("cpu")[0]


def worker_device() -> jax.Device:
  """The untrusted accelerator: the default backend's first device if it is not
  a CPU, else the second CPU device (run with
  ``XLA_FLAGS=--xla_force_host_platform_device_count=2``; importing ginn_jax
  before jax sets that for you)."""
  default = jax.devices()[0]
  if default.platform != "cpu":
    return default
  cpus = jax.devices("cpu")
  if len(cpus) < 2:
    warnings.warn(
        "only one CPU device: the worker shares the trusted device. Set "
        "XLA_FLAGS=--xla_force_host_platform_device_count=2 before jax is imported "
        "to give the worker its own device.",
        RuntimeWarning,
        stacklevel=2,
    )
    return cpus[0]
  return cpus[1]


def worker_devices() -> list[jax.Device]:
  """Every untrusted device of this process, for a sharded worker's mesh: the
  default backend's devices if it is not a CPU, else every CPU device but the
  trusted ``cpu:0`` (``[cpu:0]`` with a warning if it is the only one)."""
  default = jax.devices()
  if default[0].platform != "cpu":
    return list(default)
  cpus = jax.devices("cpu")
  return cpus[1:] if len(cpus) > 1 else [worker_device()]
