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

The tolerance is a security parameter: an attacker can use all of it on every
step (experiment 7, `experiments/stealth_threshold.py`, measures the smallest
tolerance t* at which one plants a backdoor). The calibration therefore also
reports the tolerance's margin below the t* stored for the same model and data
(`ginn_jax._src.thresholds`), warns when it is under `SAFE_MARGIN`, and lists
the worker precision settings it detected (TF32, bfloat16), which widen the
honest error and so the calibrated tolerance.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any

import jax
import numpy as np

from ginn_jax._src import thresholds as thresholds_lib
from ginn_jax._src.data import as_training_data
from ginn_jax._src.devices import worker_device
from ginn_jax._src.loop import train
from ginn_jax._src.models import Model
from ginn_jax._src.trusted import verify
from ginn_jax._src.trusted.runtime import ProtocolConfig, TrustedRuntime
from ginn_jax._src.worker.honest import HonestWorker

# Below this margin (stored t* / calibrated tolerance) calibration warns.
SAFE_MARGIN = 10.0
_LOW_PRECISION = ("bfloat16", "float16")


class ToleranceMarginWarning(UserWarning):
  """The calibrated tolerance is less than `SAFE_MARGIN` times below the
  measured stealth threshold t*."""


@dataclasses.dataclass(frozen=True)
class PrecisionReport:
  """Settings of this process that make the worker compute in reduced precision.

  Attributes:
    matmul_precision: ``jax.config.jax_default_matmul_precision`` (None: the
      backend's default, which on NVIDIA GPUs since Ampere is TF32 for float32
      matmuls). The library's own workers compute under
      ``jax.default_matmul_precision("highest")`` whatever this says.
    env: the environment variables that change matmul precision, as set
      (NVIDIA_TF32_OVERRIDE, JAX_DEFAULT_MATMUL_PRECISION, XLA_FLAGS without
      the host device count).
    param_dtypes: dtypes of the model's parameters.
    worker_platform: the worker device's platform ("cpu", "gpu", "tpu").
    findings: one line per reduced-precision setting detected (empty: none).
  """

  matmul_precision: str | None
  env: dict[str, str]
  param_dtypes: tuple[str, ...]
  worker_platform: str
  findings: tuple[str, ...]

  @property
  def reduced(self) -> bool:
    """True when any reduced-precision setting was detected."""
    return bool(self.findings)

  def to_dict(self) -> dict:
    return {"matmul_precision": self.matmul_precision, "env": dict(self.env),
            "param_dtypes": list(self.param_dtypes), "worker_platform": self.worker_platform,
            "reduced_precision_detected": self.reduced, "findings": list(self.findings)}


def detect_precision(model: Model | None = None, *, device: jax.Device | None = None) -> PrecisionReport:
  """Looks for worker precision settings (TF32, bfloat16) in this process.

  It sees this process only: the JAX config, the environment, the model's
  parameter dtypes and the worker device. A remote worker's own settings are
  invisible to it; calibrate on the hardware and software the worker uses.

  Args:
    model: the model whose parameter dtypes to inspect (no parameters are
      computed: `jax.eval_shape`).
    device: the worker device; default `ginn_jax.worker_device()`.

  Returns:
    A `PrecisionReport`.
  """
  findings = []
  prec = jax.config.jax_default_matmul_precision
  prec = None if prec is None else str(prec)
  if prec is not None and prec.lower() not in ("highest", "float32", "precision.highest"):
    findings.append(f"jax_default_matmul_precision={prec!r}: float32 matmuls in reduced precision "
                    "(TF32 or bfloat16 passes) where a worker does not ask for 'highest'")
  env = {k: os.environ[k] for k in ("NVIDIA_TF32_OVERRIDE", "JAX_DEFAULT_MATMUL_PRECISION")
         if k in os.environ}
  flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                   if "xla_force_host_platform_device_count" not in f)
  if flags:
    env["XLA_FLAGS"] = flags
  jdmp = env.get("JAX_DEFAULT_MATMUL_PRECISION", "")
  if jdmp and jdmp.lower() not in ("highest", "float32") and prec is None:
    findings.append(f"JAX_DEFAULT_MATMUL_PRECISION={jdmp!r}: reduced-precision float32 matmuls")
  if any(w in flags.lower() for w in ("tf32", "bf16", "bfloat16", "fast_min_max", "fast-math")):
    findings.append(f"XLA_FLAGS {flags!r} may change numerics (TF32, bfloat16 or fast math)")
  dtypes: tuple[str, ...] = ()
  if model is not None:
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0)))  # Traced: nothing computed.
    dtypes = tuple(sorted({str(x.dtype) for x in jax.tree_util.tree_leaves(shapes)}))
    low = [d for d in dtypes if d in _LOW_PRECISION]
    if low:
      findings.append(f"parameters in {', '.join(low)}: honest errors far above float32's")
  device = device or worker_device()
  if device.platform == "gpu" and env.get("NVIDIA_TF32_OVERRIDE") != "0" and (
      prec is None or prec.lower() not in ("highest", "float32", "precision.highest")):
    findings.append("GPU worker with TF32 allowed (NVIDIA_TF32_OVERRIDE is not 0 and the default "
                    "precision is not 'highest'): workers that do not ask for 'highest' get TF32")
  return PrecisionReport(matmul_precision=prec, env=env, param_dtypes=dtypes,
                         worker_platform=device.platform, findings=tuple(findings))


@dataclasses.dataclass(frozen=True)
class Margin:
  """How far a calibrated tolerance is below a measured stealth threshold.

  Attributes:
    margin: t* / max(tolerance.rel_l2, tolerance.max_abs) (the larger bound is
      the attacker's best case), with t* the interpolated crossing where there
      is one (it lies below the first t that reached the level, so the margin
      errs low); None when t* was not reached in the sweep.
    at_least: when t* was not reached, the margin is at least this (largest
      swept t / tolerance); else None.
    threshold: the stored measurement used.
    note: how to read it (and whether the setting differs from the run's).
  """

  margin: float | None
  at_least: float | None
  threshold: thresholds_lib.StoredThreshold
  note: str

  @property
  def safe(self) -> bool:
    m = self.margin if self.margin is not None else self.at_least
    return m is not None and m >= SAFE_MARGIN

  def to_dict(self) -> dict:
    th = self.threshold
    return {"margin": self.margin, "at_least": self.at_least, "safe": self.safe, "note": self.note,
            "t_star": th.t_star, "bracket": list(th.bracket), "t_interp": th.t_interp,
            "level": th.level, "setting": dict(th.setting), "experiment": th.experiment,
            "command": th.command, "results": th.results}


def tolerance_margin(tolerance: verify.Tolerance, threshold: thresholds_lib.StoredThreshold, *,
                     config: ProtocolConfig | None = None) -> Margin:
  """The margin of `tolerance` below `threshold`'s t*: a tolerance of 1e-5
  under a t* of 2e-2 has a margin of 2000.

  Args:
    tolerance: the calibrated tolerance.
    threshold: the stored measurement.
    config: the run's protocol; its clip is compared with the measured one.

  Returns:
    A `Margin` (``margin`` None and ``at_least`` set when t* lies above every
    swept tolerance).

  Raises:
    ValueError: `tolerance` is element-wise (the paper's rule): t* was measured
      for per-leaf tolerances, whose two numbers mean something else.
  """
  if tolerance.elementwise:
    raise ValueError(
        f"no margin for an element-wise tolerance ({tolerance.describe()}): the stored t* "
        "was measured for per-leaf tolerances (docs/experiments.md, experiments 6 and 7)")
  bound = max(tolerance.rel_l2, tolerance.max_abs)
  s = threshold.setting
  note = f"from {threshold.describe()}"
  if config is not None and (config.clip != s["clip"] or (
      config.clip != "none" and config.clip_value != s["clip_value"])):
    note += (f"; this run's clip ({config.clip} {config.clip_value}) differs from the measured "
             "one, so the margin is indicative only")
  if threshold.t_star is None:
    top = threshold.bracket[0]
    return Margin(margin=None, at_least=None if top is None or bound == 0 else top / bound,
                  threshold=threshold, note=note + "; t* was above every swept tolerance")
  t = threshold.reference
  return Margin(margin=t / bound if bound > 0 else float("inf"), at_least=None,
                threshold=threshold, note=note)


def format_times(x: float) -> str:
  """A margin for people: 2,000 / 12.5 / 0.5."""
  return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def stealth_margins(tolerance: verify.Tolerance, witness_tolerance: verify.Tolerance | None, *,
                    model_name: str, digest: str, config: ProtocolConfig | None = None,
                    path: str | os.PathLike | None = None,
                    ) -> tuple[Margin | None, Margin | None, str]:
  """The margins of both tolerances below the stored t* for this model and data.

  Args:
    tolerance, witness_tolerance: the calibrated tolerances (witness: None when
      there is none).
    model_name: the model's name (`Model.name`).
    digest: the training set's digest (`ginn_jax.dataset_digest`).
    config: the run's protocol (its clip is compared with the measured one).
    path: the stored thresholds (default: the ones shipped with the library).

  Returns:
    (margin, witness margin, note): the margins are None when nothing was
    measured for this model and data, and the note says so.

  Warns:
    ToleranceMarginWarning: a margin under `SAFE_MARGIN`.
  """
  found = thresholds_lib.lookup_thresholds(model_name, digest, path=path)
  if not found:
    return None, None, (f"no stealth threshold measured for model {model_name!r} on this dataset "
                        f"(digest {digest[:12]}...): no margin can be given; run "
                        "experiments/stealth_threshold.py for it")
  # The most dangerous measurement (smallest t*) for this model and data.
  th = min(found, key=lambda f: f.reference if f.reference is not None else float("inf"))
  margin = tolerance_margin(tolerance, th, config=config)
  wmargin = None if witness_tolerance is None else tolerance_margin(witness_tolerance, th, config=config)
  _warn_margin("tolerance", margin)
  if wmargin is not None:
    _warn_margin("witness tolerance", wmargin)
  return margin, wmargin, margin.note


def _warn_margin(name: str, m: Margin) -> None:
  if not m.safe:
    value = m.margin if m.margin is not None else m.at_least
    warnings.warn(
        f"the calibrated {name} is only {format_times(value)}x below the measured stealth threshold "
        f"t* = {m.threshold.reference:.3g} ({m.note}); under {SAFE_MARGIN:g}x an attacker inside it can "
        "come close to planting a backdoor. Calibrate at full float32 precision (no TF32, no "
        "bfloat16), lower the safety factor only with care, or measure t* for this setting "
        "(experiments/stealth_threshold.py).", ToleranceMarginWarning, stacklevel=4)


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
    margin: the tolerance's margin below the stored stealth threshold t* for
      this model and data, or None when none was measured (`margin_note`
      says which).
    witness_margin: the same for the witness tolerance. t* was measured for
      the re-computation check; experiment 7's probes show the witness check
      seeing the stealth push at 1.2 to 16 times t, so a witness-aware
      attacker needs a larger witness tolerance and this margin errs low; it
      is an estimate, not a measured witness threshold.
    margin_note: what was (or was not) found, in words.
    precision: worker precision settings detected in this process.
  """

  tolerance: verify.Tolerance
  max_rel_l2: float
  max_abs: float
  num_steps: int
  safety_factor: float
  witness_tolerance: verify.Tolerance | None = None
  witness_max_rel_l2: float | None = None
  witness_max_abs: float | None = None
  margin: Margin | None = None
  witness_margin: Margin | None = None
  margin_note: str = ""
  precision: PrecisionReport | None = None


def _frozen_of(model, config: ProtocolConfig):
  """The frozen tree a runtime of `config` would hold by default."""
  from ginn_jax._src.devices import trusted_device  # pylint: disable=g-import-not-at-top
  from ginn_jax._src.trusted import keys  # pylint: disable=g-import-not-at-top
  return model.frozen_params(jax.device_put(keys.seed_streams(config.seed).init_key, trusted_device()))


def calibrate_tolerance(model: Model, data: Any = None, labels: np.ndarray | ProtocolConfig | None = None,
                        config: ProtocolConfig | None = None, *, images: np.ndarray | None = None,
                        num_steps: int = 8,
                        safety_factor: float = 10.0, floor: verify.Tolerance = verify.DEFAULT_FLOOR,
                        witness_floor: verify.Tolerance = verify.DEFAULT_WITNESS_FLOOR,
                        worker: HonestWorker | None = None, progress: bool = False,
                        thresholds_path: str | os.PathLike | None = None,
                        frozen: Any = None) -> Calibration:
  """Measures honest worker-vs-trusted disagreement and returns a tolerance.

  Args:
    model, data, config: the run to calibrate for, as for `TrustedRuntime`
      (`data` any pytree training set, or images and labels; p is forced to 1,
      p_witness to 1 for a built-in (layered) model or when `config` asks for
      witness checks, to 0 otherwise; no witness deadline).
    num_steps: honest steps to measure (parameters evolve, so errors late in
      training are sampled too).
    safety_factor: multiplier on the largest error seen.
    floor: the smallest re-computation tolerance returned, per metric.
    witness_floor: the smallest witness tolerance returned, per metric.
    worker: the honest worker to measure; default a fresh `HonestWorker` on
      the default worker device (with ``config.num_shards`` > 1 a
      `ShardedWorker`: every shard's error is measured). The witness check is
      calibrated when the model is a built-in (layered) one or
      ``config.p_witness > 0``, and the worker has a ``witness`` method (with
      shards: every shard's witness).
    progress: show a progress bar.
    thresholds_path: the stored stealth thresholds to look the model and data
      up in (default: the ones shipped with the library).
    frozen: a fine-tuning model's frozen parameters (as for `TrustedRuntime`;
      default its ``frozen_params``), given to both sides.

  Returns:
    A `Calibration`; pass ``.tolerance`` (and ``.witness_tolerance``) to
    `TrustedRuntime`. Its ``margin`` says how far the tolerance is below the
    measured stealth threshold, when one was measured for this model and data.

  Warns:
    ToleranceMarginWarning: a margin under `SAFE_MARGIN` (10x).
  """
  if isinstance(labels, ProtocolConfig):  # calibrate_tolerance(model, data, config)
    labels, config = None, labels
  config = ProtocolConfig() if config is None else config
  data = as_training_data(data, labels, images=images)
  if worker is None and config.num_shards > 1:
    # Per shard, whatever the run's mode: whole shard gradients compared, the errors
    # an "aggregate" run's projected checks see too (in the same units, ||g||_F).
    from ginn_jax._src.worker.sharded import ShardedWorker
    config = dataclasses.replace(config, shard_mode="per_shard")
    worker = ShardedWorker(model, data, num_shards=config.num_shards, shard_mode="per_shard")
  if frozen is None and getattr(model, "frozen_params", None) is not None:
    frozen = _frozen_of(model, config)
  worker = worker or HonestWorker(model, data, frozen=frozen)
  witnessed = ((getattr(model, "layered", False) or config.p_witness > 0)
               and callable(getattr(worker, "witness", None)))
  cfg = dataclasses.replace(config, p=1.0, p_witness=1.0 if witnessed else 0.0,
                            witness_timeout_s=None)
  runtime = TrustedRuntime(model, data, cfg, tolerance=verify.UNBOUNDED,
                           witness_tolerance=verify.UNBOUNDED,
                           audit_secret=b"calibration-only-secret-0000000000", frozen=frozen)
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
  margin, wmargin, note = stealth_margins(tol, wtol, model_name=model.name,
                                          digest=runtime.dataset_digest, config=config,
                                          path=thresholds_path)
  return Calibration(tolerance=tol, max_rel_l2=rel, max_abs=mx, num_steps=num_steps,
                     safety_factor=safety_factor, witness_tolerance=wtol,
                     witness_max_rel_l2=wrel, witness_max_abs=wmx, margin=margin,
                     witness_margin=wmargin, margin_note=note,
                     precision=detect_precision(model, device=worker.device
                                                if hasattr(worker, "device") else None))
