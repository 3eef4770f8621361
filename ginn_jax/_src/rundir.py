"""Verified training that persists to, and resumes from, a run directory.

Layout of ``RUN_DIR``::

  transcript.jsonl             signed hash chain (see trusted/transcript.py)
  checkpoints/step-00000010.ckpt   params, optimizer state, step (MAC'ed blob)
  reports/step-00000012.rep    kept gradient reports (only with keep_reports)

The transcript is: header, a checkpoint at step 0, then per step a "step"
record (and a "report" record when reports are kept), a "checkpoint" record
every `checkpoint_every` steps and at the end, and a closing record with the
final parameter digest. A killed run (SIGKILL included) is resumed by calling
`run_verified` again with the same arguments and audit secret: it verifies
the transcript, loads the newest checkpoint that verifies, cuts the
transcript after that checkpoint's record and continues, so every step appears
exactly once and the final parameters are bitwise those of an uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
from typing import Any

import jax
import jaxlib
import numpy as np
import optax

from ginn_jax._src import errors
from ginn_jax._src import progress as progress_lib
from ginn_jax._src.data import as_training_data
from ginn_jax._src.models import Model
from ginn_jax._src.trusted import checkpoint as ckpt
from ginn_jax._src.trusted import commit, verify
from ginn_jax._src.trusted.runtime import ProtocolConfig, TranscriptEntry, TrustedRuntime
from ginn_jax._src.trusted.transforms import OPTIMIZERS, Optimizer, OptimizerConfig, OptimizerSpec
from ginn_jax._src.trusted.transcript import Record, TranscriptError, TranscriptWriter, entry_of
from ginn_jax._src.trusted.transcript import public_key_hex, read_transcript
from ginn_jax._src.types import Params
from ginn_jax._src.worker.honest import Worker

TRANSCRIPT = "transcript.jsonl"
# Header fields that must not change when a run is resumed.
_FIXED = ("model", "input_shape", "num_classes", "config", "tolerance", "witness_tolerance", "dataset_digest", "num_examples",
          "prng_impl", "public_key", "checkpoint_every", "keep_reports", "num_steps", "report_digest",
          "witness_plan", "frozen_digest", "finetune")
# What a header written before a field existed meant by its absence.
_LEGACY = {"report_digest": commit.LEGACY_DIGEST}


def checkpoint_name(step: int) -> str:
  return f"checkpoints/step-{step:08d}.ckpt"


def report_name(step: int) -> str:
  return f"reports/step-{step:08d}.rep"


@dataclasses.dataclass(frozen=True)
class RunResult:
  """What `run_verified` left behind.

  Attributes:
    run_dir: the run directory.
    params: parameters after the last accepted step (trusted device).
    steps: accepted steps in total (over all resumptions).
    num_verified: sampled steps found within tolerance.
    violation: the `IntegrityViolation` that halted the run, if any.
    resumed_from: the checkpoint step this call continued from (None: new run).
    final_digest: the parameter digest in the closing record.
    transcript: the runtime's entries (steps and checks) of the whole run.
  """

  run_dir: str
  params: Params
  steps: int
  num_verified: int
  violation: errors.IntegrityViolation | None
  resumed_from: int | None
  final_digest: str
  transcript: list[TranscriptEntry]

  @property
  def num_violations(self) -> int:
    return int(self.violation is not None)


def run_header(rt: TrustedRuntime, *, num_steps: int, checkpoint_every: int, keep_reports: bool,
               dataset: str | None, num_classes: int) -> dict[str, Any]:
  """The transcript header: the runtime's public header plus versions and the public key."""
  return {
      **rt.public_header(),
      "format": "ginn_jax/run/v1",
      "public_key": public_key_hex(rt.signing_seed()),
      "num_classes": num_classes,
      "dataset": dataset,
      "num_steps": num_steps,
      "checkpoint_every": checkpoint_every,
      "keep_reports": keep_reports,
      "jax_enable_x64": bool(jax.config.jax_enable_x64),
      "jax_default_prng_impl": str(jax.config.jax_default_prng_impl),
      "versions": {"ginn_jax": _version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
                   "numpy": np.__version__, "optax": optax.__version__,
                   "python": sys.version.split()[0], "platform": platform.platform()},
  }


def _version() -> str:
  import ginn_jax
  return ginn_jax.__version__


def run_verified(run_dir: str | os.PathLike, model: Model, data: Any = None, labels: Any = None,
                 config: ProtocolConfig | None = None, worker: Worker | None = None,
                 num_steps: int | None = None, *, audit_secret: bytes, images: np.ndarray | None = None,
                 checkpoint_every: int = 10, tolerance: verify.Tolerance | None = None,
                 witness_tolerance: verify.Tolerance | None = None,
                 keep_reports: bool = False, deferred: bool = False, dataset: str | None = None,
                 num_classes: int = 10, fsync: bool = True, progress: bool | str = False,
                 frozen: Params | None = None,
                 optimizer: Optimizer | None = None) -> RunResult:
  """Trains to step `num_steps`, persisting everything to `run_dir`; resumes if it exists.

  Args:
    run_dir: the run directory (created if missing, resumed if it holds a transcript).
    model, data, config, tolerance, witness_tolerance, deferred: as for
      `TrustedRuntime` (`data` any pytree training set; the classic
      ``run_verified(run_dir, model, images, labels, config, worker, n)`` works too).
    worker: the (untrusted) worker; a `MultiHostWorker` on process 0 of a
      multi-process run too (the followers keep nothing; they get HALT if
      the run halts on a violation).
    num_steps: total steps of the run (not steps to add on a resume).
    audit_secret: the runtime's private secret. It is never written to the run
      directory; pass the same secret again to resume (a different one fails
      the checkpoint MACs and the header's public key).
    checkpoint_every: steps between checkpoints (one is also taken at step 0
      and at the end).
    keep_reports: also store every accepted report (MAC'ed, its SHA-256 in the
      transcript), so an auditor can re-verify any step.
    dataset: the dataset's name for the header (lets `ginn audit` reload it).
    num_classes: the model's number of classes (for the header).
    fsync: fsync the transcript after every record.
    frozen: the frozen parameters of a fine-tuning model (`ginn_jax.lora`,
      `ginn_jax.freeze`), as for `TrustedRuntime`; committed by digest in
      the header (`frozen_digest`). A resume with other frozen parameters is
      refused. They are not written to the run directory: keep them (e.g.
      `ginn_jax.save_frozen`) to audit the run.
    optimizer: replaces `config.optimizer`: an `OptimizerSpec` (a named optax
      optimizer, e.g. ``ginn.OptimizerSpec("adam", learning_rate=1e-3)``) or an
      `OptimizerConfig`. The header records it, and a resume or an audit
      rebuilds it from there. An optax transformation has no name to record
      and is refused (TypeError), before anything is written.

  Returns:
    A `RunResult` (with ``violation`` set if the run halted on one).

  Raises:
    ReportRejected: the worker sent a malformed report; nothing was written
      for it and the run directory can be resumed.
    TranscriptError: the run directory is damaged or belongs to another run.
    TypeError: `optimizer` is not an `OptimizerSpec` or `OptimizerConfig`.
  """
  if isinstance(labels, ProtocolConfig):  # run_verified(run_dir, model, data, config, worker, n)
    labels, config, worker, num_steps = None, labels, config, worker
  data = as_training_data(data, labels, images=images)
  if config is None or worker is None or num_steps is None:
    raise TypeError("run_verified needs config, worker and num_steps")
  if optimizer is not None:
    if not isinstance(optimizer, (OptimizerSpec, OptimizerConfig)):
      raise TypeError(
          f"run_verified: optimizer= is a {type(optimizer).__name__}, which the run header cannot "
          "name, so the run could not be resumed or audited; name it with "
          f"ginn.OptimizerSpec(name, **hyperparameters) (names: {', '.join(OPTIMIZERS)}; e.g. "
          "OptimizerSpec('adam', learning_rate=1e-3)), or train without a run directory "
          "(TrustedRuntime(optimizer=...))")
    config = dataclasses.replace(config, optimizer=optimizer)
  if checkpoint_every < 1 or num_steps < 0:
    raise ValueError(f"checkpoint_every must be >= 1 and num_steps >= 0, got {checkpoint_every}, {num_steps}")
  run_dir = os.fspath(run_dir)
  path = os.path.join(run_dir, TRANSCRIPT)
  rt = TrustedRuntime(model, data, config, tolerance=tolerance,
                      witness_tolerance=witness_tolerance, audit_secret=audit_secret, deferred=deferred,
                      report_digest=_resumed_digest(path), frozen=frozen)
  header = run_header(rt, num_steps=num_steps, checkpoint_every=checkpoint_every,
                      keep_reports=keep_reports, dataset=dataset, num_classes=num_classes)
  resumed_from = None
  if os.path.exists(path):
    writer, resumed_from, closed = _resume(rt, run_dir, header, fsync)
    if closed is not None:
      writer.close()
      return _result(rt, run_dir, resumed_from, closed.body["params_digest"])
  else:
    for sub in ("checkpoints", "reports"):
      os.makedirs(os.path.join(run_dir, sub), exist_ok=True)
    writer = TranscriptWriter.create(path, header, rt.signing_seed(), fsync=fsync)
    _checkpoint(rt, run_dir, writer)
  rt.recorder = writer
  bar = progress_lib.bar(total=num_steps, initial=rt.step,
                         desc=progress if isinstance(progress, str) else "ginn run", enabled=bool(progress))
  try:
    try:
      while rt.step < num_steps:
        order = rt.next_order()
        report = worker(order)
        try:
          rt.submit(report, witness=getattr(worker, "witness", None),
                    project=getattr(worker, "project", None))
        except errors.IntegrityViolation as v:
          if keep_reports and v.step == order.step:  # Keep the violating report as evidence.
            _keep_report(run_dir, writer, rt, report, order.step, order.params)
          raise
        if keep_reports:
          _keep_report(run_dir, writer, rt, report, order.step, order.params)
        bar.update(1)
        bar.set_postfix(verified=rt.num_verified, pending=rt.num_pending, refresh=False)
        if rt.step % checkpoint_every == 0 or rt.step == num_steps:
          rt.finalize()
          _checkpoint(rt, run_dir, writer)
      rt.finalize()
    except errors.IntegrityViolation as v:
      if callable(getattr(worker, "stop", None)):  # A MultiHostWorker: its followers get HALT.
        worker.stop(halted=True)
      digest = ckpt.tree_digest(rt.state.params)
      writer.append("close", {"status": "violation", "step": rt.step, "violation_step": v.step,
                              "params_digest": digest, "num_verified": rt.num_verified})
      return _result(rt, run_dir, resumed_from, digest)
    digest = ckpt.tree_digest(rt.state.params)
    writer.append("close", {"status": "complete", "step": rt.step, "params_digest": digest,
                            "num_verified": rt.num_verified})
    return _result(rt, run_dir, resumed_from, digest)
  finally:
    bar.close()
    rt.recorder = None
    rt.close()
    writer.close()


def _resumed_digest(path: str) -> str:
  """The report digest a run continues with: its header's (unverified here;
  `_resume` checks the header), SHA-256 for a header that names none, BLAKE3
  for a new run."""
  try:
    with open(path, "rb") as f:
      body = json.loads(f.readline())["body"]
  except FileNotFoundError:
    return commit.DEFAULT_DIGEST
  except (ValueError, KeyError, TypeError, OSError):
    return commit.DEFAULT_DIGEST  # `_resume` rejects the damaged transcript.
  name = body.get("report_digest", commit.LEGACY_DIGEST) if isinstance(body, dict) else None
  return name if name in commit.DIGEST_NAMES else commit.DEFAULT_DIGEST


def _keep_report(run_dir: str, writer: TranscriptWriter, rt: TrustedRuntime, report, step: int,
                 params: Params) -> None:
  """Stores an accepted report (MAC'ed) and records its SHA-256."""
  leaves, loss = commit.validate_report(report, step=step, params=params, num_shards=rt.num_shards,
                                        aggregate=rt.aggregate)
  name = report_name(step)
  sha = ckpt.save_report(os.path.join(run_dir, name), step, leaves, loss, authenticate=rt.authenticate)
  writer.append("report", {"step": step, "file": name, "sha256": sha})


def _checkpoint(rt: TrustedRuntime, run_dir: str, writer: TranscriptWriter) -> Record:
  name = checkpoint_name(rt.step)
  sha = ckpt.save_checkpoint(os.path.join(run_dir, name), rt.state, num_verified=rt.num_verified,
                             authenticate=rt.authenticate)
  return writer.append("checkpoint", {"step": rt.step, "file": name, "sha256": sha,
                                      "num_verified": rt.num_verified,
                                      "params_digest": ckpt.tree_digest(rt.state.params)})


def _resume(rt: TrustedRuntime, run_dir: str, header: dict[str, Any],
            fsync: bool) -> tuple[TranscriptWriter, int, Record | None]:
  """Verifies the transcript, restores the newest valid checkpoint, cuts the tail."""
  path = os.path.join(run_dir, TRANSCRIPT)
  records = read_transcript(path, public_key=header["public_key"], allow_torn_tail=True)
  old = records[0].body
  last = records[-1]
  if last.type == "close" and last.body.get("status") != "complete" or any(
      r.body.get("outcome") == "violation" for r in records if r.type in ("step", "check")):
    raise errors.RuntimeHalted(f"{path}: this run halted on an integrity violation; it cannot be "
                               "resumed (start a new run with a trustworthy worker)")
  changed = [k for k in _FIXED if old.get(k, _LEGACY.get(k)) != header.get(k)]
  if "witness_plan" in changed and old.get("witness_plan") and header.get("witness_plan"):
    from ginn_jax._src.audit import plan_mismatch
    raise TranscriptError(f"cannot resume: {plan_mismatch(old['witness_plan'], header['witness_plan'])}",
                          file=path, entry=1)
  if "frozen_digest" in changed and old.get("frozen_digest") and header.get("frozen_digest"):
    raise TranscriptError(
        f"cannot resume: the frozen parameters differ from the run's (the run committed frozen digest "
        f"{old['frozen_digest'][:16]}, these have {header['frozen_digest'][:16]}); pass the frozen "
        "parameters the run was started with", file=path, entry=1)
  if changed:
    named = list(changed)
    if "config" in changed and isinstance(old.get("config"), dict) and isinstance(header.get("config"), dict):
      was, now = old["config"], header["config"]  # Name the fields, e.g. shard_mode or optimizer.
      fields = [f"config.{k} (run: {was.get(k, 'absent')}, now: {now.get(k, 'absent')})"
                for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)]
      named = [n for n in named if n != "config"] + fields
    raise TranscriptError(f"this run directory was made with other settings ({'; '.join(named)} "
                          "differ); use a new run directory or the original settings and secret",
                          file=path, entry=1)
  rejected = []
  for rec in reversed(records):
    if rec.type != "checkpoint":
      continue
    try:
      state, meta = ckpt.load_checkpoint(os.path.join(run_dir, rec.body["file"]), rt.state,
                                         expected_sha256=rec.body["sha256"], authenticate=rt.authenticate)
    except (TranscriptError, OSError) as e:
      rejected.append(f"{rec.body.get('file')}: {e}")
      continue
    if state.step != rec.body["step"]:
      rejected.append(f"{rec.body['file']}: step {state.step} differs from its record")
      continue
    break
  else:
    raise TranscriptError(f"no checkpoint verifies ({'; '.join(rejected) or 'none recorded'})", file=path)
  kept = records[:rec.seq + 1]
  closed = records[-1] if records[-1].type == "close" and records[-1].seq == rec.seq + 1 else None
  entries = [entry_of(r) for r in kept if r.type in ("step", "check")]
  rt.restore(state, entries, int(meta["num_verified"]))
  if closed is not None:
    return TranscriptWriter(path, rt.signing_seed(), seq=closed.seq + 1, prev=closed.hash, fsync=fsync), \
        state.step, closed
  writer = TranscriptWriter.resume(path, rec, rt.signing_seed(), fsync=fsync)
  writer.append("resume", {"step": state.step, "rejected_checkpoints": rejected})
  return writer, state.step, None


def _result(rt: TrustedRuntime, run_dir: str, resumed_from: int | None, digest: str) -> RunResult:
  return RunResult(run_dir=run_dir, params=rt.state.params, steps=rt.step, num_verified=rt.num_verified,
                   violation=rt.halted, resumed_from=resumed_from, final_digest=digest,
                   transcript=list(rt.transcript))
