"""Calibrating the verification tolerance (docs/design.md section 5).

Runs honest steps on the worker's device, recomputes every one on the
trusted device, and returns the largest disagreement times a safety factor,
never below a floor. For a layered model every step is also witness-checked
(Freivalds, docs/design.md section 10) and the witness check's tolerance is
calibrated the same way, against its own floor. Run it once per (model, hardware, software) combination
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
  """The calibrated tolerances and the errors they were derived from.

  Attributes:
    tolerance: the re-computation tolerance (``TrustedRuntime(tolerance=...)``).
    max_rel_l2, max_abs: the largest re-computation errors measured.
    num_steps: honest steps measured.
    safety_factor: multiplier applied to the largest errors.
    witness_tolerance: the witness-check tolerance
      (``TrustedRuntime(witness_tolerance=...)``), or None when the model is not
      layered (it has no witness checks) or the worker cannot answer them.
    witness_max_rel_l2, witness_max_abs: the largest witness-check errors
      measured (None when not measured).
  """

  tolerance: verify.Tolerance
  max_rel_l2: float
  max_abs: float
  num_steps: int
  safety_factor: float
  witness_tolerance: verify.Tolerance | None = None
  witness_max_rel_l2: float | None = None
  witness_max_abs: float | None = None


def calibrate_tolerance(model: Model, images: np.ndarray, labels: np.ndarray,
                        config: ProtocolConfig = ProtocolConfig(), *, num_steps: int = 8,
                        safety_factor: float = 10.0, floor: verify.Tolerance = verify.DEFAULT_FLOOR,
                        witness_floor: verify.Tolerance = verify.DEFAULT_WITNESS_FLOOR,
                        worker: HonestWorker | None = None, progress: bool = False) -> Calibration:
  """Measures honest worker-vs-trusted disagreement and returns a tolerance.

  Args:
    model, images, labels, config: the run to calibrate for (p is forced to 1;
      p_witness to 1 for a layered model, to 0 otherwise; no witness deadline).
    num_steps: honest steps to measure (parameters evolve, so errors late in
      training are sampled too).
    safety_factor: multiplier on the largest error seen.
    floor: the smallest re-computation tolerance returned, per metric.
    witness_floor: the smallest witness tolerance returned, per metric.
    worker: the honest worker to measure; default a fresh `HonestWorker` on
      the default worker device. The witness check is calibrated only when
      the model is layered and the worker has a ``witness`` method.

  Returns:
    A `Calibration`; pass ``.tolerance`` (and ``.witness_tolerance``) to
    `TrustedRuntime`.
  """
  worker = worker or HonestWorker(model, images, labels)
  witnessed = model.layered and callable(getattr(worker, "witness", None))
  cfg = dataclasses.replace(config, p=1.0, p_witness=1.0 if witnessed else 0.0,
                            witness_timeout_s=None)
  runtime = TrustedRuntime(model, images, labels, cfg, tolerance=verify.UNBOUNDED,
                           witness_tolerance=verify.UNBOUNDED,
                           audit_secret=b"calibration-only-secret-0000000000")
  result = train(runtime, worker, num_steps, progress="calibrate" if progress else False)
  rel = max(e.max_rel_l2 for e in result.transcript)
  mx = max(e.max_abs for e in result.transcript)
  tol = verify.Tolerance(rel_l2=max(floor.rel_l2, safety_factor * rel),
                         max_abs=max(floor.max_abs, safety_factor * mx))
  wtol = wrel = wmx = None
  if witnessed:
    wrel = max(e.witness_rel_l2 for e in result.transcript)
    wmx = max(e.witness_max_abs for e in result.transcript)
    wtol = verify.Tolerance(rel_l2=max(witness_floor.rel_l2, safety_factor * wrel),
                            max_abs=max(witness_floor.max_abs, safety_factor * wmx))
  return Calibration(tolerance=tol, max_rel_l2=rel, max_abs=mx, num_steps=num_steps,
                     safety_factor=safety_factor, witness_tolerance=wtol,
                     witness_max_rel_l2=wrel, witness_max_abs=wmx)
