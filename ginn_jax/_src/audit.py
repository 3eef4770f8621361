"""Third-party audit of a run directory (`ginn audit RUN_DIR`).

The auditor needs only the run directory, the public key (in the header, or
given out of band), and the public data: the dataset (checked against the
header's digest) and the model. It never needs the audit secret. It checks:

1. the transcript: canonical form, hash chain and Ed25519 signature of every
   record, then its meaning: steps 0, 1, 2, ... each exactly once, deferred
   checks resolved, no violation, checkpoints at the step they claim, a
   closing record whose digest is the last checkpoint's;
2. every checkpoint and kept report against the SHA-256 in its signed record
   (and the MACs too, if the secret is given), checkpoint 0 against the
   seed's initial state, every kept report against its step's digest;
3. segments between consecutive checkpoints, all or a random sample of the
   auditor's choice: re-trains each from its first checkpoint with the
   seed-derived batches and keys; each step with a kept report is compared
   with the recomputed gradient (tolerance from the header) and the report is
   applied, otherwise the recomputed gradient is; the result must match the
   next checkpoint within `param_tolerance`.

Returns an `AuditReport` (one item per file, step or segment); its
`first_failure` names the file, entry and step.
"""
from __future__ import annotations

import dataclasses
import os
import secrets
from typing import Any

import jax
import numpy as np

from ginn_jax._src import errors
from ginn_jax._src import shards as shards_lib
from ginn_jax._src.data import as_training_data, dataset_digest, num_examples
from ginn_jax._src.devices import trusted_device
from ginn_jax._src.models import Model, get_model, list_models
from ginn_jax._src.rundir import TRANSCRIPT
from ginn_jax._src.step import DeviceGradFn
from ginn_jax._src.trusted import checkpoint as ckpt
from ginn_jax._src.trusted import commit, keys, verify
from ginn_jax._src.trusted.runtime import ProtocolConfig, TrainState, apply_update, init_state
from ginn_jax._src.trusted.transcript import Record, TranscriptError, read_transcript
from ginn_jax._src.trusted.transforms import make_update_transform, optimizer_from_dict


@dataclasses.dataclass(frozen=True)
class AuditItem:
  """One checked thing: a file, the transcript's structure, a step or a segment."""

  kind: str
  name: str
  ok: bool
  detail: str = ""
  step: int | None = None

  def __str__(self) -> str:
    return f"{'ok  ' if self.ok else 'FAIL'} {self.kind:10s} {self.name}: {self.detail}"


@dataclasses.dataclass
class AuditReport:
  """The auditor's findings, in the order they were checked."""

  run_dir: str
  items: list[AuditItem] = dataclasses.field(default_factory=list)
  seed: int | None = None

  @property
  def ok(self) -> bool:
    return bool(self.items) and all(i.ok for i in self.items)

  @property
  def first_failure(self) -> AuditItem | None:
    return next((i for i in self.items if not i.ok), None)

  def to_dict(self) -> dict[str, Any]:
    f = self.first_failure
    return {"run_dir": self.run_dir, "ok": self.ok, "seed": self.seed,
            "first_failure": None if f is None else str(f),
            "items": [dataclasses.asdict(i) for i in self.items]}


def audit_run(run_dir: str | os.PathLike, *, model: Model | None = None, images: np.ndarray | None = None,
              labels: np.ndarray | None = None, data: Any = None, sample: str | int = "all",
              seed: int | None = None,
              public_key: str | None = None, audit_secret: bytes | None = None,
              param_tolerance: verify.Tolerance | None = None, data_dir: str | None = None,
              frozen: Any = None) -> AuditReport:
  """Audits a run directory (see the module docstring).

  Args:
    run_dir: what `run_verified` left behind.
    model, images, labels: the public model and training data; loaded from the
      header's model and dataset names when omitted (a model of your own,
      `ginn_jax.PureModel` or `from_nnx`, must be passed).
    data: the training set as one pytree (instead of images and labels).
    sample: "all" segments, or how many to re-train (chosen at random).
    seed: the auditor's own seed for that choice (random when omitted).
    public_key: the run's Ed25519 public key (hex) obtained out of band; the
      header's key is checked against it.
    audit_secret: optional; also checks the files' MACs.
    param_tolerance: per-leaf (rel_l2, max_abs) bound between a re-trained
      segment and its checkpoint; default: the header tolerance times the
      segment's length (exact on the same CPU; the bound matters across hardware).
    data_dir: for loading the dataset by name.
    frozen: for a fine-tuning run (its header has a ``frozen_digest``): its
      frozen parameters, as a tree or the path of a file written by
      `ginn_jax.save_frozen`. Checked against the header's digest, then used
      to re-train. A built-in base with ``lora``/``freeze`` is rebuilt from
      the header's ``finetune`` when `model` is omitted.

  Returns:
    An `AuditReport`; ``report.ok`` is False and ``report.first_failure``
    names the file, entry and step of the first problem.
  """
  run_dir = os.fspath(run_dir)
  report = AuditReport(run_dir)
  path = os.path.join(run_dir, TRANSCRIPT)
  try:
    records = read_transcript(path, public_key=public_key)
  except (TranscriptError, OSError) as e:
    report.items.append(AuditItem("transcript", path, False, str(e), getattr(e, "step", None)))
    return report
  report.items.append(AuditItem("transcript", path, True, f"{len(records)} records, chain and signatures ok"))
  structure = _check_structure(records, path)
  report.items.extend(structure)
  if not all(i.ok for i in structure):
    return report
  header = records[0].body
  mac = None
  if audit_secret is not None:
    audit_keys = keys.audit_keys(audit_secret)
    mac = lambda data, *, label: keys.storage_mac(audit_keys, data, label=label)  # noqa: E731
  try:
    if data is None and images is not None and labels is not None:
      data = as_training_data(images, labels)
    frozen_tree = _frozen_tree(frozen)
  except (OSError, ValueError) as e:
    report.items.append(AuditItem("frozen parameters", str(frozen), False, f"cannot read them: {e}"))
    return report
  if "frozen_digest" in header or frozen_tree is not None:
    item = _check_frozen(header, frozen_tree, path)
    report.items.append(item)
    if not item.ok:
      return report
  try:
    ctx = _Context(header, model, data, data_dir, frozen_tree)
  except (ValueError, KeyError, TypeError) as e:
    report.items.append(AuditItem("header", path, False, f"cannot rebuild the run from its header: {e}"))
    return report
  if "witness_plan" in header:
    report.items.append(_check_plan(header["witness_plan"], ctx, path))
    if not report.ok:
      return report
  states, reports = _check_files(records, run_dir, path, ctx, mac, report)
  if not report.ok:
    return report
  ckpts = sorted(states)
  segments = list(zip(ckpts, ckpts[1:]))
  if sample != "all":
    report.seed = seed if seed is not None else secrets.randbits(63)
    rng = np.random.default_rng(report.seed)
    k = min(int(sample), len(segments))
    segments = [segments[i] for i in sorted(rng.choice(len(segments), size=k, replace=False))]
  for a, b in segments:
    report.items.append(_replay(ctx, states[a], states[b], reports, param_tolerance))
  return report


class _Context:
  """The public pieces needed to re-train: model, data, transform, keys."""

  def __init__(self, header, model, data, data_dir, frozen=None):
    if data is None:
      from ginn_jax._src.data import load_dataset
      data = load_dataset(header["dataset"] or "mnist5k", data_dir=data_dir).train
    if dataset_digest(data) != header["dataset_digest"]:
      raise ValueError("the training data does not match the header's dataset digest")
    if model is None and header.get("finetune") and header["finetune"].get("base") in list_models():
      from ginn_jax._src import finetune
      if header["finetune"].get("method") == "freeze" and header["finetune"].get("pretrained"):
        raise ValueError(
            "this run trains leaves of a pretrained base (ginn.freeze(..., params=...)): their "
            "starting values are not in the frozen file, so pass the model that holds them "
            "(audit_run(run_dir, model=..., frozen=...))")
      base = get_model(header["finetune"]["base"], input_shape=tuple(header["input_shape"] or ()),
                       num_classes=header["num_classes"])
      model = finetune.from_description(base, header["finetune"], name=header["model"])
    if model is None:
      if header["model"] not in list_models():
        raise ValueError(f"the run's model {header['model']!r} is not a built-in model; pass it "
                         "to the audit (audit_run(run_dir, model=...))")
      model = get_model(header["model"], input_shape=tuple(header["input_shape"]),
                        num_classes=header["num_classes"])
    self.model = model
    cfg = dict(header["config"])
    cfg.setdefault("shard_mode", "per_shard")  # A header without it: a per-shard run (or no shards).
    self.config = ProtocolConfig(**{**cfg, "optimizer": optimizer_from_dict(cfg.get("optimizer"))})
    self.tolerance = verify.Tolerance.from_dict(header["tolerance"])
    # Runs made before the digest was named in the header used SHA-256.
    self.report_digest = header.get("report_digest", commit.LEGACY_DIGEST)
    if self.report_digest not in commit.DIGEST_NAMES:
      raise ValueError(f"the header names an unknown report digest {self.report_digest!r} "
                       f"(this version knows {', '.join(commit.DIGEST_NAMES)})")
    self.num_shards = self.config.num_shards
    self.aggregate = self.config.aggregate  # Reports are the shards' mean, clipped as one.
    self.tx = make_update_transform(self.config.clip, self.config.clip_value, self.config.optimizer,
                                    1 if self.aggregate else self.num_shards)
    self.streams = keys.seed_streams(self.config.seed)
    self.schedule = keys.BatchSchedule(self.streams.data_key, num_examples(data), self.config.batch_size)
    self.device = trusted_device()
    self.initial = init_state(self.model, self.tx, self.streams.init_key)
    self.frozen = None if frozen is None else jax.device_put(frozen, self.device)
    self.grad_fn = DeviceGradFn(self.model.loss, data, self.device, frozen=self.frozen)
    self.paths = verify.leaf_paths(self.initial.params)
    self.treedef = jax.tree_util.tree_structure(self.initial.params)


def _check_plan(recorded: dict, ctx: "_Context", path: str) -> AuditItem:
  """The run's witness plan, traced again here, against the header's."""
  from ginn_jax._src.program import UnsupportedProgram
  from ginn_jax._src.step import step_program
  try:
    plan = step_program(ctx.model.loss, ctx.initial.params, ctx.grad_fn.data,
                        ctx.config.batch_size // ctx.num_shards, ctx.frozen).plan
  except UnsupportedProgram as e:
    return AuditItem("witness plan", path, False, f"the model's program cannot be witness-checked: {e}")
  if plan.digest != recorded.get("digest"):
    return AuditItem("witness plan", path, False, plan_mismatch(recorded, plan.summary()))
  return AuditItem("witness plan", path, True, f"{len(plan.products)} products, digest {plan.digest[:16]}")


def _frozen_tree(frozen):
  if frozen is None or not isinstance(frozen, (str, os.PathLike)):
    return frozen
  from ginn_jax._src.finetune import load_frozen
  return load_frozen(frozen)


def _check_frozen(header: dict, frozen, path: str) -> AuditItem:
  """The frozen parameters given to the audit against the header's digest."""
  from ginn_jax._src.trusted.runtime import frozen_digest
  recorded = header.get("frozen_digest")
  if recorded is None:
    return AuditItem("frozen parameters", path, False, "frozen parameters were given, but this run has "
                     "none (its header commits no frozen_digest)")
  if frozen is None:
    return AuditItem("frozen parameters", path, False, f"this run fine-tunes a frozen base (frozen digest "
                     f"{recorded[:16]}); pass its frozen parameters (frozen=, or ginn audit --frozen FILE)")
  got = frozen_digest(frozen)
  if got != recorded:
    return AuditItem("frozen parameters", path, False, f"the frozen parameters given have digest "
                     f"{got[:16]}, the run committed {recorded[:16]}: they are not the run's base")
  return AuditItem("frozen parameters", path, True, f"digest {recorded[:16]} matches the header")


def plan_mismatch(recorded: dict, now: dict) -> str:
  """Says how a run's recorded witness plan and the one traced now differ."""
  return (f"the witness plan differs: the run was made with plan {str(recorded.get('digest'))[:16]} "
          f"({recorded.get('products')} products, jax {recorded.get('jax_version')}), this process "
          f"traced plan {now['digest'][:16]} ({now['products']} products, jax {now['jax_version']}); the "
          "loss's gradient program changed (another jax version, model, loss or batch shape), so its "
          "witnesses would not be checked against the same products. Use the jax version and model "
          "the run was made with")


def _fail(path: str, rec: Record, msg: str, step: int | None = None) -> AuditItem:
  step = rec.body.get("step") if step is None else step
  return AuditItem("transcript", f"{path}: entry {rec.line}", False, f"step {step}: {msg}", step)


def _check_structure(records: list[Record], path: str) -> list[AuditItem]:
  """Meaning of the chain: each step once and in order, no violation, a close."""
  items: list[AuditItem] = []
  step, pending, halted, last_step_rec = 0, set(), False, None
  for prev, rec in zip(records, records[1:]):
    b, t = rec.body, rec.type
    s = b.get("step")
    if not isinstance(s, int) or isinstance(s, bool):
      return items + [_fail(path, rec, "record has no integer step")]
    if rec.type != "close" and halted and t not in ("report", "check"):
      return items + [_fail(path, rec, "record after the run halted")]
    if t == "step":
      if s != step:
        return items + [_fail(path, rec, f"step {s} where step {step} was expected (a step is "
                                         "missing or appears twice)")]
      if b.get("outcome") == "violation":
        items.append(_fail(path, rec, "the run recorded an integrity violation here"))
        halted = True
      else:
        step += 1
        if b.get("outcome") == "pending":
          pending.add(s)
      last_step_rec = rec
    elif t == "check":
      if s not in pending:
        return items + [_fail(path, rec, "check of a step that was not pending")]
      pending.discard(s)
      if b.get("outcome") == "violation":
        items.append(_fail(path, rec, "a deferred check found an integrity violation"))
        halted = True
    elif t == "report":
      if last_step_rec is None or last_step_rec.body["step"] != s or prev.type != "step":
        return items + [_fail(path, rec, "report record not right after its step's record")]
    elif t == "checkpoint":
      if s != step or pending:
        return items + [_fail(path, rec, f"checkpoint claims step {s} at step {step} "
                                         f"(pending checks: {sorted(pending)})")]
    elif t == "resume":
      if prev.type != "checkpoint" or prev.body.get("step") != s:
        return items + [_fail(path, rec, "resume record not right after the checkpoint it resumes")]
    elif t == "close":
      if rec is not records[-1]:
        return items + [_fail(path, rec, "records after the closing record")]
      if s != step:
        return items + [_fail(path, rec, f"closing record claims step {s}, the transcript has {step}")]
  last = records[-1]
  if last.type != "close":
    items.append(_fail(path, last, "no closing record: the run is unfinished or its tail was removed"))
  elif last.body.get("status") == "complete":
    ck = [r for r in records if r.type == "checkpoint"]
    if not ck or ck[-1].body["params_digest"] != last.body.get("params_digest") or pending:
      items.append(_fail(path, last, "final digest is not the last checkpoint's, or checks are pending"))
  if not any(not i.ok for i in items):
    items.append(AuditItem("structure", path, True, f"{step} steps, each once and in order"))
  return items


def _check_files(records, run_dir, path, ctx: _Context, mac, report: AuditReport):
  """Checks every checkpoint and kept report; returns the states and reports."""
  states: dict[int, TrainState] = {}
  reports: dict[int, tuple[list[np.ndarray], np.float32]] = {}
  digests = {r.body["step"]: r.body["digest"] for r in records if r.type == "step"}
  for rec in records:
    if rec.type not in ("checkpoint", "report"):
      continue
    step, file = rec.body["step"], os.path.join(run_dir, str(rec.body.get("file")))
    try:
      if rec.type == "checkpoint":
        state, _ = ckpt.load_checkpoint(file, ctx.initial, expected_sha256=rec.body["sha256"],
                                        authenticate=mac)
        if state.step != step:
          raise TranscriptError(f"holds step {state.step}", file=file, step=step)
        if step == 0 and ckpt.tree_digest(state) != ckpt.tree_digest(ctx.initial):
          raise TranscriptError("is not the initial state of the public seed", file=file, step=0)
        states[step] = state
      else:
        leaves, loss = ckpt.load_report(file, step=step, expected_sha256=rec.body["sha256"],
                                        authenticate=mac, num_shards=ctx.num_shards)
        if commit.report_digest(step, leaves, loss, name=ctx.report_digest).hex() != digests.get(step):
          raise TranscriptError("report does not match its step's digest", file=file, step=step)
        reports[step] = (leaves, loss)
      report.items.append(AuditItem(rec.type, rec.body["file"], True, "sha256 ok", step))
    except (TranscriptError, OSError) as e:
      report.items.append(AuditItem(rec.type, f"{file} (transcript entry {rec.line})", False,
                                    f"step {step}: {e}", step))
  return states, reports


@jax.jit
def _shard_mean(grads):
  return jax.tree_util.tree_map(lambda g: g.mean(axis=0), grads)


def _replay(ctx: _Context, start: TrainState, end: TrainState, reports, tol) -> AuditItem:
  """Re-trains [start.step, end.step) and compares with `end`."""
  name = f"steps {start.step}..{end.step}"
  state = jax.device_put(start, ctx.device)
  n_rep = 0
  for t in range(start.step, end.step):
    if ctx.num_shards == 1:
      loss, grads = ctx.grad_fn(state.params, ctx.schedule.indices(t), keys.layer_key(ctx.streams, t))
    else:  # Each shard as the worker and the verifier compute it; the update clips each.
      loss, grads = shards_lib.sharded_grads(ctx.grad_fn, state.params, ctx.schedule.indices(t),
                                             keys.layer_key(ctx.streams, t), ctx.num_shards)
      if ctx.aggregate:  # The shards' mean, clipped and applied as one gradient.
        grads = _shard_mean(grads)
    if t in reports:
      leaves, rep_loss = jax.device_put(reports[t], ctx.device)
      ref = jax.tree_util.tree_leaves(grads)
      if ctx.num_shards == 1 or ctx.aggregate:
        c = verify.compare(leaves, rep_loss, ref, loss, ctx.paths, tolerance=ctx.tolerance)
      else:
        rows = [shards_lib.shard_row([*leaves, rep_loss, *ref, loss], s) for s in range(ctx.num_shards)]
        n = len(leaves)
        c = verify.ShardComparisons(tuple(range(ctx.num_shards)), tuple(
            verify.compare(r[:n], r[n], r[n + 1:-1], r[-1], ctx.paths, tolerance=ctx.tolerance)
            for r in rows))
      try:
        verify.check(c, ctx.tolerance, step=t)
      except errors.IntegrityViolation as v:
        return AuditItem("segment", name, False, f"step {t}: the kept report is not the gradient: {v}", t)
      grads, n_rep = jax.tree_util.tree_unflatten(ctx.treedef, leaves), n_rep + 1
    state = apply_update(ctx.tx, state, grads)
  n = end.step - start.step
  tol = tol or verify.Tolerance(ctx.tolerance.rel_l2 * n, ctx.tolerance.max_abs * n)
  got = jax.device_get(jax.tree_util.tree_leaves((state.params, state.opt_state)))
  want = jax.tree_util.tree_leaves((end.params, end.opt_state))
  worst = (0.0, 0.0)
  for g, w in zip(got, want):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    d = g - w
    rel = float(np.linalg.norm(d) / max(np.linalg.norm(w), 1e-30))
    mx = float(np.max(np.abs(d), initial=0.0) / max(np.max(np.abs(w), initial=0.0), 1e-30))
    worst = (max(worst[0], rel), max(worst[1], mx))
  kept = f" ({n_rep} kept reports re-verified)" if n_rep else ""
  detail = (f"re-trained {n} steps{kept}; vs checkpoint: "
            f"rel_l2 {worst[0]:.2e}, max_abs {worst[1]:.2e}")
  if worst[0] > tol.rel_l2 or worst[1] > tol.max_abs:
    return AuditItem("segment", name, False, f"step {end.step}: checkpoint differs from the re-trained "
                     f"state beyond tolerance ({tol.rel_l2:.1e}, {tol.max_abs:.1e}): {detail}", end.step)
  return AuditItem("segment", name, True, detail)
