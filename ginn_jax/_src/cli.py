"""The `ginn` command (also `python -m ginn_jax`)."""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Sequence

from ginn_jax._src.models import list_models


def _demo(args) -> int:
  from ginn_jax._src.demo import DemoConfig, run_demo, write_json
  from ginn_jax._src.models import is_language_model
  if is_language_model(args.model):
    raise SystemExit(f"ginn demo: its BadNets attack needs an image model, not {args.model}; train a "
                     f"language model with `ginn train --model {args.model}`")

  cfg = DemoConfig(steps=args.steps, attack_start=args.attack_start, p=args.p,
                   p_witness=args.p_witness, clip=args.clip,
                   clip_value=args.clip_value, seed=args.seed, dataset=args.dataset,
                   data_dir=args.data_dir, model=args.model, batch_size=args.batch_size,
                   learning_rate=args.lr)
  summary = run_demo(cfg, progress=not args.no_progress, run_dir=args.run_dir or None,
                     checkpoint_every=args.checkpoint_every)
  if args.json:
    write_json(summary, args.json)
    print(f"summary written to {args.json}")
  return 0


def _audit(args) -> int:
  from ginn_jax._src.audit import audit_run

  sample = args.sample if args.sample == "all" else int(args.sample)
  report = audit_run(args.run_dir, sample=sample, seed=args.seed, public_key=args.public_key,
                     data_dir=args.data_dir, frozen=args.frozen)
  for item in report.items:
    if args.verbose or not item.ok or item.kind in ("transcript", "structure", "segment",
                                                     "frozen parameters"):
      print(item)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report.to_dict(), f, indent=2)
  if not report.ok:
    f = report.first_failure
    print(f"ginn audit: FAILED: {f.name}: {f.detail}" if f else "ginn audit: FAILED: nothing checked",
          file=sys.stderr)
    return 1
  print(f"ginn audit: OK ({args.run_dir})")
  return 0


def _optimizer(args, default):
  """The optimizer of ``--optimizer``: `default` (an `OptimizerConfig` from
  --lr) when it is not given; else an `OptimizerSpec`: a name (with --lr, and
  --momentum where the command has it, for "momentum"), or a JSON object
  ``{"name": ..., ...}`` (its learning_rate, or --lr)."""
  from ginn_jax._src.trusted.transforms import OptimizerSpec

  given = args.optimizer
  if given is None:
    return default
  if given.lstrip().startswith("{"):
    try:
      d = json.loads(given)
    except ValueError as e:
      raise ValueError(f"--optimizer: not valid JSON ({e}): {given}") from None
    if not isinstance(d, dict):
      raise ValueError(f"--optimizer: expected a JSON object, got {given}")
  else:
    d = {"name": given, **({"momentum": args.momentum} if given == "momentum" and hasattr(args, "momentum")
                           else {})}
  try:
    return OptimizerSpec.from_dict({"learning_rate": args.lr, **d})
  except (TypeError, ValueError) as e:
    raise ValueError(f"--optimizer: {e}") from None


def _optimizer_help(default: str) -> str:
  from ginn_jax._src.trusted.transforms import OPTIMIZERS, SCHEDULES

  return (f"the optimizer after the clip: a name ({', '.join(OPTIMIZERS)}; learning rate --lr), or a "
          "JSON OptimizerSpec like '{\"name\": \"adamw\", \"learning_rate\": {\"schedule\": "
          "\"cosine_decay\", \"init_value\": 0.001, \"decay_steps\": 1000}, \"weight_decay\": "
          f"0.01}}' (schedules: {', '.join(SCHEDULES)}); default: {default}")


def _train(args) -> int:
  if args.num_processes > 1 or args.coordinator_address is not None:
    return _train_multihost(args)
  import ginn_jax as ginn

  from ginn_jax._src.models import is_language_model, lm_training_data
  if is_language_model(args.model):  # The built-in LMs train on the Python help texts.
    if args.run_dir:
      raise ValueError(f"--run-dir: `ginn audit` cannot reload the training text of {args.model}; "
                       "persist a language model's run from Python (ginn_jax.run_verified)")
    ds = None
    model = ginn.get_model(args.model, input_shape=(1, 1, 1))
    train_data = lm_training_data()
  else:
    ds = ginn.load_dataset(args.dataset, data_dir=args.data_dir)
    model = ginn.get_model(args.model, input_shape=ds.image_shape, num_classes=ds.num_classes)
    train_data = ds.train
  cfg = ginn.ProtocolConfig(seed=args.seed, batch_size=args.batch_size, p=args.p,
                            p_witness=args.p_witness, clip=args.clip, clip_value=args.clip_value,
                            optimizer=_optimizer(args, ginn.OptimizerConfig(learning_rate=args.lr)),
                            num_shards=args.num_shards, shard_mode=args.shard_mode)
  tol, wtol = _tolerances(args, cfg)
  if tol is None or (wtol is None and cfg.p_witness > 0):
    cal = ginn.calibrate_tolerance(model, train_data, cfg)
    tol = tol or cal.tolerance
    wtol = wtol or cal.witness_tolerance
  worker = (ginn.ShardedWorker(model, train_data, num_shards=cfg.num_shards, shard_mode=cfg.shard_mode)
            if cfg.num_shards > 1 else ginn.HonestWorker(model, train_data))
  if args.run_dir:
    code, out = _train_in_run_dir(args, ginn, model, ds, cfg, tol, wtol, worker)
    print(json.dumps(out, indent=2))
    return code
  rt = ginn.TrustedRuntime(model, train_data, cfg, tolerance=tol, witness_tolerance=wtol)
  res = ginn.train(rt, worker, args.steps, progress=not args.no_progress)
  if ds is None:
    from ginn_jax._src import text
    test = text.windows(text.pydoc_corpus().test_text, train_data["tokens"].shape[1] - 1)
    metric = {"test_perplexity": ginn.perplexity(model.merge(res.params), test)}
  else:
    metric = {"clean_accuracy": ginn.accuracy(model, res.params, ds.test_images, ds.test_labels)}
  out = {**res.summary(), **metric, "optimizer": cfg.to_dict()["optimizer"], "tolerance": tol.to_dict(),
         "p_witness": cfg.p_witness, "witness_tolerance": rt.witness_tolerance.to_dict(),
         "dataset_digest": rt.dataset_digest,
         **({"num_shards": cfg.num_shards, "shard_mode": cfg.shard_mode} if cfg.num_shards > 1 else {})}
  print(json.dumps(out, indent=2))
  return 0


def _run_dir_header(run_dir: str | None) -> dict | None:
  """The header of the run directory's transcript, None for a new run. Not
  verified here: `run_verified` verifies it (its signature, and that the run's
  settings are those of the header) before it resumes."""
  import os

  from ginn_jax._src.rundir import TRANSCRIPT
  if not run_dir or not os.path.exists(os.path.join(run_dir, TRANSCRIPT)):
    return None
  path = os.path.join(run_dir, TRANSCRIPT)
  with open(path, "rb") as f:
    try:
      return json.loads(f.readline())["body"]
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f"{path}: its transcript has no readable header ({e})") from None


def _tolerances(args, cfg):
  """--tolerance and --witness-tolerance; on a resumed --run-dir, where not
  given, those of the run's header (a calibration would not give them again
  bit for bit, and the run must keep its tolerances)."""
  import ginn_jax as ginn
  tol = ginn.Tolerance.from_dict(json.loads(args.tolerance)) if args.tolerance else None
  wtol = ginn.Tolerance.from_dict(json.loads(args.witness_tolerance)) if args.witness_tolerance else None
  header = _run_dir_header(getattr(args, "run_dir", None))
  if header is not None:
    if tol is None and header.get("tolerance"):
      tol = ginn.Tolerance.from_dict(header["tolerance"])
    if wtol is None and cfg.p_witness > 0 and header.get("witness_tolerance"):
      wtol = ginn.Tolerance.from_dict(header["witness_tolerance"])
  return tol, wtol


def _audit_secret(args) -> bytes:
  """The run's audit secret: read from --audit-secret-file (default
  ``RUN_DIR.secret``, beside the run directory, never in it), or, for a new
  run whose file does not exist, drawn from the OS and written there (mode 0600)."""
  import os

  from ginn_jax._src.trusted import keys
  path = args.audit_secret_file or os.path.normpath(args.run_dir) + ".secret"
  try:
    with open(path) as f:
      text = f.read().strip()
  except FileNotFoundError:
    if _run_dir_header(args.run_dir) is not None:
      raise ValueError(f"--run-dir {args.run_dir}: the run exists but its audit secret {path} does "
                       "not; resume it with the secret it was started with (--audit-secret-file)"
                       ) from None
    secret = keys.new_audit_secret()
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
      f.write(secret.hex() + "\n")
    return secret
  try:
    return bytes.fromhex(text)
  except ValueError:
    raise ValueError(f"{path}: an audit secret file holds the secret in hex") from None


def _train_in_run_dir(args, ginn, model, ds, cfg, tol, wtol, worker) -> tuple[int, dict]:
  """`run_verified` into --run-dir (resumed if it exists); its exit code and summary."""
  from ginn_jax._src.rundir import run_verified
  res = run_verified(args.run_dir, model, ds.train, cfg, worker, args.steps,
                     audit_secret=_audit_secret(args), checkpoint_every=args.checkpoint_every,
                     tolerance=tol, witness_tolerance=wtol, dataset=args.dataset,
                     num_classes=ds.num_classes, progress=not args.no_progress)
  losses = [e.loss for e in res.transcript if e.kind == "step" and e.outcome != "violation"]
  header = _run_dir_header(args.run_dir)
  out = {"steps": res.steps, "num_verified": res.num_verified, "num_violations": res.num_violations,
         "verified": res.violation is None, "final_loss": losses[-1] if losses else None,
         "violation_step": None if res.violation is None else res.violation.step,
         "clean_accuracy": ginn.accuracy(model, res.params, ds.test_images, ds.test_labels),
         "tolerance": header["tolerance"], "p_witness": cfg.p_witness,
         "witness_tolerance": header["witness_tolerance"],
         "dataset_digest": header["dataset_digest"], "run_dir": res.run_dir,
         "resumed_from": res.resumed_from, "final_digest": res.final_digest,
         "public_key": header["public_key"]}
  if res.violation is not None:
    print(f"ginn train: the run halted on an integrity violation at step {res.violation.step}: "
          f"{res.violation}", file=sys.stderr)
  return (0 if res.violation is None else 2), out


def _train_multihost(args) -> int:
  """`ginn train` as one process of a multi-process run: process 0 hosts the
  trusted runtime and prints the summary, the others follow its orders."""
  if args.coordinator_address is None:
    raise ValueError(f"--num-processes {args.num_processes}: give every process the same "
                     "--coordinator-address HOST:PORT (process 0's address, a free port)")
  import os

  import ginn_jax as ginn

  # Gloo prints to the C-level stdout when it connects; keep stdout for the
  # JSON summary alone by pointing fd 1 at stderr until the run is over.
  sys.stdout.flush()
  stdout = os.dup(1)
  os.dup2(2, 1)
  try:
    code, summary = _run_multihost(args, ginn)
  finally:
    sys.stdout.flush()
    os.dup2(stdout, 1)
    os.close(stdout)
  if summary is not None:
    print(json.dumps(summary, indent=2))
  return code


def _run_multihost(args, ginn) -> tuple[int, dict | None]:
  """The multi-process run: its exit code, and the summary on process 0."""
  ginn.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
  try:
    ds = ginn.load_dataset(args.dataset, data_dir=args.data_dir)
    model = ginn.get_model(args.model, input_shape=ds.image_shape, num_classes=ds.num_classes)
    num_shards = args.num_shards  # A multiple of the mesh's size (ShardedWorker checks).
    shard_mode = ginn.shards.resolve_shard_mode(args.shard_mode, num_shards)
    cfg = ginn.ProtocolConfig(seed=args.seed, batch_size=args.batch_size, p=args.p,
                              p_witness=args.p_witness, clip=args.clip,
                              clip_value=args.clip_value, num_shards=num_shards, shard_mode=shard_mode,
                              optimizer=_optimizer(args, ginn.OptimizerConfig(learning_rate=args.lr)))
    # Every process, before any work order: the same model, data and settings.
    ginn.check_agreement(model, ds.train, cfg)
    mesh = ginn.global_worker_mesh()
    inner = ginn.ShardedWorker(model, ds.train_images, ds.train_labels, num_shards=num_shards,
                               mesh=mesh, shard_mode=shard_mode)
    worker = ginn.MultiHostWorker(inner, batch_size=args.batch_size)
    if args.process_id != 0:
      result = ginn.follow(worker)
      if result.halted:
        print(f"ginn train: process {args.process_id}: the run halted after {result.steps} steps "
              "(process 0 says why)", file=sys.stderr)
        return 2, None
      return 0, None
    with worker:  # Whatever happens from here on, the followers are told to stop.
      tol, wtol = _tolerances(args, cfg)
      if tol is None or (wtol is None and cfg.p_witness > 0):
        # On process 0's own devices alone, while the followers wait.
        local = ginn.ShardedWorker(model, ds.train_images, ds.train_labels, num_shards=num_shards,
                                   mesh=ginn.global_worker_mesh(process=0), shard_mode=shard_mode)
        cal = ginn.calibrate_tolerance(model, ds.train_images, ds.train_labels, cfg, worker=local)
        tol = tol or cal.tolerance
        wtol = wtol or cal.witness_tolerance
      if args.run_dir:  # Process 0 (the trusted runtime) alone keeps the run directory.
        code, out = _train_in_run_dir(args, ginn, model, ds, cfg, tol, wtol, worker)
        return code, {**out, "num_shards": num_shards, "num_processes": args.num_processes}
      rt = ginn.TrustedRuntime(model, ds.train_images, ds.train_labels, cfg, tolerance=tol,
                               witness_tolerance=wtol)
      res = ginn.train_multihost(rt, worker, args.steps, progress=not args.no_progress)
    acc = ginn.accuracy(model, res.params, ds.test_images, ds.test_labels)
    out = {**res.summary(), "clean_accuracy": acc, "tolerance": tol.to_dict(),
           "p_witness": cfg.p_witness, "witness_tolerance": rt.witness_tolerance.to_dict(),
           "dataset_digest": rt.dataset_digest, "num_shards": num_shards, "shard_mode": shard_mode,
           "num_processes": args.num_processes}
    return 0, out
  except Exception as e:
    if not isinstance(e, (ginn.GinnError, ValueError, FileNotFoundError)):  # main() says those.
      # Said now: a peer that died makes the shutdown below abort this process.
      print(f"ginn train: process {args.process_id}: error: {type(e).__name__}: {e}",
            file=sys.stderr, flush=True)
    raise
  finally:
    ginn.shutdown_distributed()


def _calibrate(args) -> int:
  import warnings

  import ginn_jax as ginn

  ds = ginn.load_dataset(args.dataset, data_dir=args.data_dir)
  model = ginn.get_model(args.model, input_shape=ds.image_shape, num_classes=ds.num_classes)
  cfg = ginn.ProtocolConfig(batch_size=args.batch_size, clip=args.clip,
                            clip_value=None if args.clip == "none" else args.clip_value)
  with warnings.catch_warnings():  # Said below, in one line each.
    warnings.simplefilter("ignore", ginn.ToleranceMarginWarning)
    cal = ginn.calibrate_tolerance(model, ds.train_images, ds.train_labels, cfg, num_steps=args.steps,
                                   safety_factor=args.safety_factor, progress=not args.no_progress)
  wtol = cal.witness_tolerance
  print(json.dumps({"tolerance": cal.tolerance.to_dict(), "max_rel_l2": cal.max_rel_l2,
                    "max_abs": cal.max_abs, "num_steps": cal.num_steps,
                    "witness_tolerance": wtol.to_dict() if wtol is not None else None,
                    "witness_max_rel_l2": cal.witness_max_rel_l2,
                    "witness_max_abs": cal.witness_max_abs,
                    "worker_device": str(ginn.worker_device()),
                    "trusted_device": str(ginn.trusted_device()),
                    "stealth_margin": None if cal.margin is None else cal.margin.to_dict(),
                    "witness_stealth_margin": (None if cal.witness_margin is None
                                               else cal.witness_margin.to_dict()),
                    "margin_note": cal.margin_note,
                    "precision": cal.precision.to_dict()}, indent=2))
  for line in _margin_lines(cal):
    print(f"ginn calibrate: {line}", file=sys.stderr)
  return 0


def _margin_lines(cal) -> list[str]:
  """The margin below the stealth threshold and the precision findings, in words."""
  from ginn_jax._src.calibrate import SAFE_MARGIN, format_times

  if cal.margin is None:
    lines = [f"stealth margin: unknown ({cal.margin_note})"]
  else:
    lines = []
    for name, m in (("tolerance", cal.margin), ("witness tolerance", cal.witness_margin)):
      if m is None:
        continue
      th = m.threshold
      value = (f"{format_times(m.margin)}x below t* = {th.reference:.3g}" if m.margin is not None
               else f"at least {format_times(m.at_least)}x below t* (t* above every swept "
                    "tolerance)")
      head = "stealth margin" if m.safe else f"WARNING: stealth margin under {SAFE_MARGIN:g}x"
      lines.append(f"{head}: {name} {value} ({m.note})")
  p = cal.precision
  lines.append("precision: " + ("; ".join(p.findings) if p.reduced else
                                f"no reduced-precision setting detected (worker on {p.worker_platform}, "
                                f"parameters {', '.join(p.param_dtypes)})"))
  return lines


def _shard_mode(args) -> str:
  from ginn_jax._src.shards import resolve_shard_mode
  return resolve_shard_mode(args.shard_mode, args.num_shards)


def _analyze_aggregate(args, analysis, finite) -> dict:
  """`ginn analyze --num-shards S --shard-mode aggregate`: a lie on one shard
  (the cheapest way to account for a changed mean) and on all S, the clip's
  bound (2C whatever the shards) and the trusted cost per step."""
  from ginn_jax._src.trusted.transforms import OptimizerConfig

  S = args.num_shards
  b = analysis.aggregate_deviation_bound(args.clip, args.clip_value,
                                         OptimizerConfig(learning_rate=args.lr, momentum=args.momentum))
  out = {"num_shards": S, "shard_mode": "aggregate", "deviation_per_step": finite(b.per_step),
         "deviation_with_momentum": finite(b.with_momentum), "note": b.note,
         "trusted_gradients_per_step": 1, "trusted_scalars_per_step_per_leaf": S,
         "check_cost_per_step": analysis.aggregate_check_cost(
             args.p or 0.0, args.p_witness or 0.0, args.witness_ratio or 1.0, num_shards=S),
         "sum_check_miss_probability_at_x": {str(x): analysis.projection_miss_probability(x)
                                             for x in (1e-3, 1e-2, 1e-1)}}
  for name, m in (("lie_on_one_shard", 1), ("lie_on_all_shards", S)):
    if args.k is not None and args.p is not None:
      out[name] = {"lied_shards": m, "detection_probability": analysis.aggregate_detection_probability(
          args.p, args.k, num_shards=S, lied_shards=m, p_witness=args.p_witness or 0.0)}
  return out


def _analyze(args) -> int:
  from ginn_jax._src import analysis
  from ginn_jax._src.trusted.transforms import OptimizerConfig

  out = {}
  if args.k is not None and args.p is not None:
    out["detection_probability"] = analysis.detection_probability(args.p, args.k)
  if args.p_witness is not None:
    if not 0.0 <= args.p_witness <= 1.0:
      raise ValueError(f"--p-witness must be in [0, 1], got {args.p_witness}")
    out["p_witness"] = args.p_witness
  if args.k is not None and (args.p is not None or args.p_witness is not None):
    out["combined_detection_probability"] = analysis.combined_detection_probability(
        args.p or 0.0, args.p_witness or 0.0, args.k)
  if args.k is not None:
    out[f"p_for_{args.target}"] = analysis.required_p(args.target, args.k)
    out["required_p_witness"] = analysis.required_p_witness(args.target, args.k, args.p or 0.0)
  if args.witness_ratio is not None:
    out["trusted_cost"] = analysis.trusted_cost(args.p or 0.0, args.p_witness or 0.0,
                                                args.witness_ratio)
  if args.p is not None:
    out[f"k_for_{args.target}"] = analysis.required_k(args.target, args.p)
    out["ideal_speedup"] = analysis.ideal_speedup(args.p)
  opt = _optimizer(args, OptimizerConfig(learning_rate=args.lr, momentum=args.momentum))
  b = analysis.deviation_bound(args.clip, args.clip_value, opt)
  finite = lambda x: x if math.isfinite(x) else None  # noqa: E731  (JSON has no Infinity)
  out["deviation_bound"] = {"norm": b.norm, "bounded": b.bounded, "per_step": finite(b.per_step),
                            "with_momentum": finite(b.with_momentum), "note": b.note}
  if args.num_shards is not None and _shard_mode(args) == "aggregate":
    out["shards"] = _analyze_aggregate(args, analysis, finite)
  elif args.num_shards is not None:  # The one-shard and the all-shard attacker.
    opt = OptimizerConfig(learning_rate=args.lr, momentum=args.momentum)
    S = args.num_shards
    shards = {}
    for name, m in (("one_shard", 1), ("all_shards", S)):
      sb = analysis.shard_deviation_bound(args.clip, args.clip_value, opt, num_shards=S,
                                          corrupted_shards=m)
      shards[name] = {"corrupted_shards": m, "deviation_per_step": finite(sb.per_step),
                      "deviation_with_momentum": finite(sb.with_momentum)}
      if args.k is not None and args.p is not None:
        shards[name]["detection_probability"] = analysis.shard_detection_probability(
            args.p, args.k, num_shards=S, corrupted_shards=m)
    out["shards"] = {"num_shards": S, "shard_mode": "per_shard", **shards}
  if "ideal_speedup" in out:
    out["ideal_speedup"] = finite(out["ideal_speedup"])
  if f"k_for_{args.target}" in out:
    out[f"k_for_{args.target}"] = finite(out[f"k_for_{args.target}"])
  print(json.dumps(out, indent=2))
  return 0


def _data(args) -> int:
  from ginn_jax._src import data

  if args.data_cmd == "list":
    print("\n".join(data.list_datasets()))
  elif args.data_cmd == "prepare":
    data.prepare_tfds(args.name, args.data_dir)
    print(f"prepared {args.name} in {args.data_dir}")
  elif args.data_cmd == "digest":
    ds = data.load_dataset(args.name, data_dir=args.data_dir)
    print(json.dumps({"dataset": args.name, "train": ds.digest("train"), "test": ds.digest("test")},
                     indent=2))
  return 0


def _bench(args) -> int:
  import os
  import subprocess

  counts = tuple(int(s) for s in args.shard_counts.split(","))
  if args.only == "shards" and not os.environ.get("GINN_BENCH_FORCED_DEVICES"):
    import jax
    need = 1 + max(counts)  # The trusted device and one worker device per shard.
    if jax.devices()[0].platform == "cpu" and len(jax.devices("cpu")) < need:
      flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                       if "xla_force_host_platform_device_count" not in f)
      env = dict(os.environ, GINN_BENCH_FORCED_DEVICES="1",
                 XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={need}".strip())
      print(f"ginn bench: re-running with {need} forced CPU devices", file=sys.stderr)
      return subprocess.call([sys.executable, "-m", "ginn_jax", *args.argv], env=env)
  from ginn_jax._src.bench import (BenchConfig, format_ceiling, format_check_cost, format_shards,
                                   format_table, run_bench, write_json)

  cfg = BenchConfig(model=args.model, batch_size=args.batch_size, steps=args.steps,
                    repeats=args.repeats, warmup=args.warmup,
                    ps=tuple(float(p) for p in args.ps.split(",")),
                    modes=tuple(args.modes.split(",")),
                    p_witnesses=tuple(float(p) for p in args.p_witnesses.split(",") if p.strip()),
                    check_repeats=args.check_repeats, only=args.only,
                    ceiling_steps=args.ceiling_steps, ceiling_repeats=args.ceiling_repeats,
                    shard_counts=counts, shard_steps=args.shard_steps,
                    shard_repeats=args.shard_repeats, lora_rank=args.lora_rank,
                    shard_mode=args.shard_mode)
  result = run_bench(cfg, progress=not args.no_progress)
  print(format_table(result))
  if args.only in (None, "check-cost"):
    print(format_check_cost(result))
  if args.only in (None, "ceiling"):
    print(format_ceiling(result))
  if args.only == "shards":
    print(format_shards(result))
  if args.json:
    write_json(result, args.json)
    print(f"results written to {args.json}")
  return 0


def _add_training_args(p: argparse.ArgumentParser, *, steps: int) -> None:
  p.add_argument("--dataset", default="mnist5k", help="mnist5k (default, offline), digits, or a TFDS name")
  p.add_argument("--data-dir", default=None, help="local TFDS data_dir for full datasets")
  p.add_argument("--model", default="mnist_cnn", choices=list_models(),
                 help="mnist_cnn, vgg11, mlp, or decoder_lm_<d_model> (on the Python help texts)")
  p.add_argument("--steps", type=int, default=steps)
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--p", type=float, default=0.1, help="verification probability per step")
  p.add_argument("--clip", default="elementwise", choices=["elementwise", "global_norm", "none"])
  p.add_argument("--clip-value", type=float, default=0.01, help="clip bound C")
  p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate")
  p.add_argument("--seed", type=int, default=0, help="public training seed")
  p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="ginn", description="GINN: integrity-verified training on untrusted accelerators.")
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

  demo = sub.add_parser("demo", help="honest and attacked verified training on mnist5k (the main job)")
  _add_training_args(demo, steps=600)
  demo.add_argument("--attack-start", type=int, default=300, help="first malicious step")
  demo.add_argument("--p-witness", type=float, default=1.0,
                    help="witness-check (Freivalds) probability per step (default 1: every step)")
  demo.add_argument("--json", default=None, metavar="PATH", help="write the summary as JSON")
  demo.add_argument("--run-dir", default="runs/demo", metavar="DIR",
                    help="persist each run (DIR/honest, DIR/attacked) for `ginn audit` (default: runs/demo; "
                         "'' to keep nothing)")
  demo.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints")
  demo.set_defaults(func=_demo)

  au = sub.add_parser("audit", help="check a run directory's transcript, signatures and checkpoints; "
                      "re-train segments")
  au.add_argument("run_dir", metavar="RUN_DIR")
  au.add_argument("--sample", default="all", help='"all" segments or how many to re-train at random')
  au.add_argument("--seed", type=int, default=None, help="the auditor's seed for the sample")
  au.add_argument("--public-key", default=None, help="expected Ed25519 public key (hex) of the run")
  au.add_argument("--data-dir", default=None, help="local TFDS data_dir for full datasets")
  au.add_argument("--frozen", default=None, metavar="FILE",
                  help="a fine-tuning run's frozen parameters (ginn_jax.save_frozen), checked "
                       "against the header's frozen digest")
  au.add_argument("--json", default=None, metavar="PATH", help="write the report as JSON")
  au.add_argument("--verbose", action="store_true", help="print every checked file")
  au.set_defaults(func=_audit)

  tr = sub.add_parser("train", help="verified training with an honest worker; prints a JSON summary")
  _add_training_args(tr, steps=500)
  tr.add_argument("--tolerance", default=None, help='JSON {"rel_l2": ..., "max_abs": ...}; calibrated if omitted')
  tr.add_argument("--p-witness", type=float, default=0.0,
                  help="witness-check (Freivalds) probability per step; any model (its witness is "
                       "derived from its gradient program)")
  tr.add_argument("--witness-tolerance", default=None,
                  help='witness-check tolerance, JSON like --tolerance; calibrated if omitted')
  tr.add_argument("--optimizer", default=None, metavar="NAME|JSON",
                  help=_optimizer_help("SGD with momentum 0.9 and weight decay 5e-4 at --lr"))
  tr.add_argument("--num-shards", type=int, default=1,
                  help="cut each step's batch into this many shards, computed data-parallel over the "
                       "worker's devices (ginn_jax.ShardedWorker); each shard has its own "
                       "verification coin (--batch-size must be a multiple)")
  tr.add_argument("--shard-mode", default=None, choices=["per_shard", "aggregate"],
                  help="with --num-shards > 1: 'aggregate' (the default) reports the shards' mean, "
                       "checked by a secret projection of every shard; 'per_shard' reports every "
                       "shard's gradient, each clipped before the average")
  tr.add_argument("--run-dir", default=None, metavar="DIR",
                  help="persist the run to DIR (signed transcript, checkpoints) for `ginn audit`, and "
                       "resume it from DIR when DIR holds one (the same command again after a "
                       "crash or a kill, on every process of a multi-process run: process 0 keeps "
                       "DIR, the others need nothing)")
  tr.add_argument("--checkpoint-every", type=int, default=50,
                  help="with --run-dir: steps between checkpoints (also at step 0 and the end)")
  tr.add_argument("--audit-secret-file", default=None, metavar="FILE",
                  help="with --run-dir: the run's audit secret (hex); default DIR.secret beside "
                       "the run directory, created for a new run. Keep it private: it signs the "
                       "transcript, and a resume needs it")
  many = tr.add_argument_group(
      "many hosts", "one run over several processes (jax.distributed): start the same command on "
      "every host with its own --process-id; process 0 hosts the trusted runtime and prints the "
      "summary")
  many.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                    help="process 0's address and a free port, the same on every process")
  many.add_argument("--num-processes", type=int, default=1, metavar="N",
                    help="processes in the run (default 1: this one only)")
  many.add_argument("--process-id", type=int, default=0, metavar="I",
                    help="this process, 0..N-1 (0 hosts the trusted runtime)")
  tr.set_defaults(func=_train)

  cal = sub.add_parser("calibrate", help="measure honest worker-vs-trusted error; print a tolerance")
  cal.add_argument("--dataset", default="mnist5k")
  cal.add_argument("--data-dir", default=None)
  cal.add_argument("--model", default="mnist_cnn")
  cal.add_argument("--batch-size", type=int, default=64)
  cal.add_argument("--steps", type=int, default=16)
  cal.add_argument("--safety-factor", type=float, default=10.0)
  cal.add_argument("--clip", default="elementwise", choices=["elementwise", "global_norm", "none"],
                   help="the run's clip (compared with the setting of the stored stealth threshold)")
  cal.add_argument("--clip-value", type=float, default=0.01, help="the run's clip bound C")
  cal.add_argument("--no-progress", action="store_true")
  cal.set_defaults(func=_calibrate)

  be = sub.add_parser("bench", help="GINN vs unprotected vs pure-TEE speed, measured in one process")
  be.add_argument("--model", default="mnist_cnn", choices=list_models(),
                  help="an image model, or decoder_lm_<d_model> (on the Python help texts)")
  be.add_argument("--batch-size", type=int, default=64)
  be.add_argument("--steps", type=int, default=20, help="timed steps per block")
  be.add_argument("--repeats", type=int, default=5, help="interleaved blocks per configuration")
  be.add_argument("--warmup", type=int, default=3)
  be.add_argument("--ps", default="0,0.01,0.05,0.1,0.5", help="comma-separated verification rates")
  be.add_argument("--modes", default="sync,deferred")
  be.add_argument("--p-witnesses", default="0.1,0.5,1",
                  help="comma-separated witness-check rates (rows at p = 0; '' for none)")
  be.add_argument("--check-repeats", type=int, default=None,
                  help="interleaved repetitions of the check-cost measurement (default: as many "
                       "as fit in about 90 s, 3 to 21)")
  be.add_argument("--only", default=None, choices=["check-cost", "ceiling", "shards"],
                  help="measure only this part (check-cost: the trusted cost of re-computing vs "
                       "witness-checking one step, and the worker's cost of the witness; ceiling: "
                       "the trusted side's own cost per step with a worker that costs nothing, "
                       "against its memory floor and a pure-TEE step; shards: the protocol cost "
                       "with --shard-counts shards at the same batch, and one shard's "
                       "re-computation against the whole batch's, with 1 + max(S) forced CPU "
                       "devices when there are fewer)")
  be.add_argument("--shard-counts", default="1,2,4",
                  help="shard counts --only shards compares (the first is the baseline)")
  be.add_argument("--shard-steps", type=int, default=8, help="recorded steps per shard count")
  be.add_argument("--shard-mode", default="aggregate", choices=["per_shard", "aggregate"],
                  help="the shard mode --only shards measures")
  be.add_argument("--shard-repeats", type=int, default=7, help="interleaved repetitions")
  be.add_argument("--lora-rank", type=int, default=None, metavar="R",
                  help="fine-tune the model with LoRA adapters of rank R, its base frozen (with "
                       "--only ceiling or check-cost)")
  be.add_argument("--ceiling-steps", type=int, default=8,
                  help="recorded honest steps the ceiling replays")
  be.add_argument("--ceiling-repeats", type=int, default=7,
                  help="interleaved replays per ceiling configuration")
  be.add_argument("--json", default=None, metavar="PATH")
  be.add_argument("--no-progress", action="store_true")
  be.set_defaults(func=_bench)

  an = sub.add_parser("analyze", help="detection probability, required p or k, deviation bound")
  an.add_argument("--k", type=int, default=None, help="malicious steps the attack needs")
  an.add_argument("--p", type=float, default=None, help="verification probability")
  an.add_argument("--p-witness", type=float, default=None,
                  help="witness-check probability (independent of --p)")
  an.add_argument("--witness-ratio", type=float, default=None,
                  help="re-computation cost / witness-check cost; prints the expected trusted cost")
  an.add_argument("--target", type=float, default=0.999, help="target detection probability")
  an.add_argument("--clip", default="elementwise", choices=["elementwise", "global_norm", "none"])
  an.add_argument("--clip-value", type=float, default=0.01, help="clip bound C (the demo's default)")
  an.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (the demo's default)")
  an.add_argument("--momentum", type=float, default=0.9)
  an.add_argument("--optimizer", default=None, metavar="NAME|JSON",
                  help=_optimizer_help("SGD at --lr with --momentum") + "; only sgd and momentum have "
                  "a bound")
  an.add_argument("--num-shards", type=int, default=None,
                  help="also the deviation bound and detection probability (with --k and --p) of an "
                       "attacker that corrupts one shard and of one that corrupts all S")
  an.add_argument("--shard-mode", default=None, choices=["per_shard", "aggregate"],
                  help="the shard mode --num-shards analyses (default: 'aggregate', as ginn train)")
  an.set_defaults(func=_analyze)

  data = sub.add_parser("data", help="list, prepare (needs network) or digest datasets")
  dsub = data.add_subparsers(dest="data_cmd", required=True, metavar="DATA_COMMAND")
  dsub.add_parser("list", help="known dataset names")
  prep = dsub.add_parser("prepare", help="download and build a TFDS dataset (needs network and tensorflow)")
  prep.add_argument("name")
  prep.add_argument("--data-dir", required=True)
  dig = dsub.add_parser("digest", help="SHA-256 digests of a dataset's splits")
  dig.add_argument("name")
  dig.add_argument("--data-dir", default=None)
  data.set_defaults(func=_data)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  args.argv = list(sys.argv[1:] if argv is None else argv)
  from ginn_jax._src.errors import GinnError
  try:
    return args.func(args)
  except (GinnError, FileNotFoundError, ValueError) as e:
    print(f"ginn {args.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
