"""Calibrating the verification tolerance (docs/design.md section 5).

Runs honest steps on the worker's device, recomputes every one on the
trusted device, and returns the largest disagreement times a safety factor,
never below a floor. Run it once per (model, hardware, software) combination
and store the result: the tolerance is part of the run's public header.

Security note: calibrate with a worker you trust (the library's own
`HonestWorker` on hardware you control, of the same kind the cloud uses). A
malicious worker during calibration could widen the tolerance it later hides in.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ginn_jax._src.loop import train
from ginn_jax._src.models import Model
from ginn_jax._src.trusted import verify
from ginn_jax._src.trusted.runtime import ProtocolConfig, TrustedRuntime
from ginn_jax._src.worker.honest import HonestWorker


@dataclasses.dataclass(frozen=True)
class Calibration:
  """The calibrated tolerance and the errors it was derived from."""

  tolerance: verify.Tolerance
  max_rel_l2: float
  max_abs: float
  num_steps: int
  safety_factor: float


def calibrate_tolerance(model: Model, images: np.ndarray, labels: np.ndarray,
                        config: ProtocolConfig = ProtocolConfig(), *, num_steps: int = 8,
                        safety_factor: float = 10.0, floor: verify.Tolerance = verify.DEFAULT_FLOOR,
                        worker: HonestWorker | None = None, progress: bool = False) -> Calibration:
  """Measures honest worker-vs-trusted disagreement and returns a tolerance.

  Args:
    model, images, labels, config: the run to calibrate for (p is forced to 1).
    num_steps: honest steps to measure (parameters evolve, so errors late in
      training are sampled too).
    safety_factor: multiplier on the largest error seen.
    floor: the smallest tolerance returned, per metric.
    worker: the honest worker to measure; default a fresh `HonestWorker` on
      the default worker device.

  Returns:
    A `Calibration`; pass ``.tolerance`` to `TrustedRuntime`.
  """
  cfg = dataclasses.replace(config, p=1.0)
  runtime = TrustedRuntime(model, images, labels, cfg, tolerance=verify.UNBOUNDED,
                           audit_secret=b"calibration-only-secret-0000000000")
  worker = worker or HonestWorker(model, images, labels)
  result = train(runtime, worker, num_steps, progress="calibrate" if progress else False)
  rel = max(e.max_rel_l2 for e in result.transcript)
  mx = max(e.max_abs for e in result.transcript)
  tol = verify.Tolerance(rel_l2=max(floor.rel_l2, safety_factor * rel),
                         max_abs=max(floor.max_abs, safety_factor * mx))
  return Calibration(tolerance=tol, max_rel_l2=rel, max_abs=mx, num_steps=num_steps,
                     safety_factor=safety_factor)
