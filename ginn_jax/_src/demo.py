"""`ginn demo`: verified training on mnist5k, honest and attacked.

1. Calibrate the tolerance with the library's honest worker.
2. Honest run: no violation expected; print clean test accuracy.
3. Attacked run, same public seed: a BadNets worker (3x3 white patch,
   bottom-right, all-to-one target 0) starts reporting poisoned gradients at
   `attack_start`; random verification catches it: every step's witness is
   checked (Freivalds, p_witness = 1) and 10% of steps are re-computed. Print the step it started,
   the step it was caught and what the backdoor had reached by then.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Any

from ginn_jax._src import analysis, errors
from ginn_jax._src.calibrate import calibrate_tolerance
from ginn_jax._src.data import load_dataset
from ginn_jax._src.loop import train
from ginn_jax._src.metrics import accuracy, attack_success_rate
from ginn_jax._src.models import get_model
from ginn_jax._src.rundir import run_verified
from ginn_jax._src.trusted import keys
from ginn_jax._src.triggers import PatchTrigger
from ginn_jax._src.trusted.runtime import ProtocolConfig, TrustedRuntime
from ginn_jax._src.trusted.transforms import OptimizerConfig
from ginn_jax._src.worker.honest import HonestWorker
from ginn_jax._src.worker.malicious import BackdoorWorker
from ginn_jax._src.worker.schedules import FromStep


@dataclasses.dataclass(frozen=True)
class DemoConfig:
  dataset: str = "mnist5k"
  model: str = "mnist_cnn"
  steps: int = 600
  attack_start: int = 300
  p: float = 0.1
  p_witness: float = 1.0
  clip: str = "elementwise"
  clip_value: float = 0.01
  learning_rate: float = 0.05
  batch_size: int = 64
  seed: int = 0
  target: int = 0
  poison_fraction: float = 0.1
  calibration_steps: int = 8
  data_dir: str | None = None


def run_demo(cfg: DemoConfig = DemoConfig(), *, progress: bool = True, log=print,
             run_dir: str | None = None, checkpoint_every: int = 50) -> dict[str, Any]:
  """Runs the demo and returns its summary (what `--json` writes).

  Args:
    cfg: the demo's settings.
    progress: show progress bars.
    log: where to print.
    run_dir: if given, each run persists a run directory (transcript,
      checkpoints) in ``run_dir/honest`` and ``run_dir/attacked`` for
      `ginn audit`; the audit secret is fresh and never written down.
    checkpoint_every: steps between checkpoints in those run directories.
  """
  t0 = time.perf_counter()
  ds = load_dataset(cfg.dataset, data_dir=cfg.data_dir)
  model = get_model(cfg.model, input_shape=ds.image_shape, num_classes=ds.num_classes)
  protocol = ProtocolConfig(seed=cfg.seed, batch_size=cfg.batch_size, p=cfg.p,
                            p_witness=cfg.p_witness, clip=cfg.clip,
                            clip_value=cfg.clip_value,
                            optimizer=OptimizerConfig(learning_rate=cfg.learning_rate))
  trigger = PatchTrigger(size=3, value=1.0, position="bottom_right")
  x, y = ds.train_images, ds.train_labels

  cal = calibrate_tolerance(model, x, y, protocol, num_steps=cfg.calibration_steps)
  log(f"calibrated tolerance: rel_l2<={cal.tolerance.rel_l2:.2e} max_abs<={cal.tolerance.max_abs:.2e} "
      f"(largest honest error seen: {cal.max_rel_l2:.2e} / {cal.max_abs:.2e})")
  if cal.witness_tolerance is not None:
    log(f"calibrated witness tolerance: rel_l2<={cal.witness_tolerance.rel_l2:.2e} "
        f"max_abs<={cal.witness_tolerance.max_abs:.2e} (largest honest error seen: "
        f"{cal.witness_max_rel_l2:.2e} / {cal.witness_max_abs:.2e})")

  def evaluate(params):
    return (accuracy(model, params, ds.test_images, ds.test_labels),
            attack_success_rate(model, params, ds.test_images, ds.test_labels,
                                trigger=trigger, target=cfg.target))

  def run(name, worker):
    if run_dir is None:
      rt = TrustedRuntime(model, x, y, protocol, tolerance=cal.tolerance,
                          witness_tolerance=cal.witness_tolerance)
      return train(rt, worker, cfg.steps, progress=f"{name} run" if progress else False,
                   raise_on_violation=False)
    path = os.path.join(run_dir, name)
    if os.path.exists(os.path.join(path, "transcript.jsonl")):
      shutil.rmtree(path)  # The demo starts fresh runs; `run_verified` would resume them.
    return run_verified(path, model, x, y, protocol, worker, cfg.steps,
                        audit_secret=keys.new_audit_secret(), checkpoint_every=checkpoint_every,
                        tolerance=cal.tolerance, witness_tolerance=cal.witness_tolerance,
                        dataset=cfg.dataset, num_classes=ds.num_classes,
                        progress=f"{name} run" if progress else False)

  honest = run("honest", HonestWorker(model, x, y))
  honest_acc, honest_asr = evaluate(honest.params)
  log(f"honest run: {honest.steps} steps, {honest.num_verified} verified, "
      f"{honest.num_violations} violations, clean accuracy {honest_acc:.4f}, ASR {honest_asr:.4f}")

  attacker = BackdoorWorker(model, x, y, schedule=FromStep(cfg.attack_start), trigger=trigger,
                            target=cfg.target, poison_fraction=cfg.poison_fraction)
  attacked = run("attacked", attacker)
  attack_acc, attack_asr = evaluate(attacked.params)
  v: errors.IntegrityViolation | None = attacked.violation
  k_before = len([s for s in attacker.malicious_steps if v is None or s < v.step])
  if v is not None:
    what = (f"{v.leaf}: {v.reason}" if v.error is None else
            f"{v.leaf}, rel_l2 {v.error['rel_l2']:.3e} > {v.tolerance.rel_l2:.1e}")
    by = "the witness check" if v.check == "witness" else "re-computation"
    log(f"attacked run: malicious from step {cfg.attack_start}, CAUGHT at step {v.step} by {by} "
        f"({what}); {k_before} malicious steps were applied unverified before it")
  else:
    log(f"attacked run: malicious from step {cfg.attack_start}, NOT caught in {cfg.steps} steps")
  log(f"model at the halt: clean accuracy {attack_acc:.4f}, backdoor ASR {attack_asr:.4f}")

  bound = analysis.deviation_bound(cfg.clip, cfg.clip_value, protocol.optimizer)
  summary = {
      "config": dataclasses.asdict(cfg),
      "tolerance": cal.tolerance.to_dict(),
      "witness_tolerance": None if cal.witness_tolerance is None else cal.witness_tolerance.to_dict(),
      "p_witness": protocol.p_witness,
      "honest_steps": honest.steps,
      "honest_steps_verified": honest.num_verified,
      "honest_violations": honest.num_violations,
      "honest_clean_accuracy": honest_acc,
      "honest_asr": honest_asr,
      "attack_first_malicious_step": attacker.malicious_steps[0] if attacker.malicious_steps else None,
      "attack_detected": v is not None,
      "attack_detected_at_step": None if v is None else v.step,
      "attack_detected_by": None if v is None else v.check,
      "attack_malicious_steps_applied": k_before,
      "attack_steps_verified": attacked.num_verified,
      "attack_clean_accuracy_at_halt": attack_acc,
      "attack_asr_at_halt": attack_asr,
      "steps_verified": honest.num_verified + attacked.num_verified,
      "per_step_deviation_bound": bound.per_step,
      "detection_probability_per_malicious_step": analysis.combined_detection_probability(
          protocol.p, protocol.p_witness, 1),
      "seconds": round(time.perf_counter() - t0, 1),
  }
  _print_table(summary, log)
  if run_dir is not None:
    summary["run_dirs"] = {n: os.path.join(run_dir, n) for n in ("honest", "attacked")}
    log(f"run directories: {run_dir}/honest and {run_dir}/attacked "
        f"(check them with `ginn audit {os.path.join(run_dir, 'honest')}`)")
  return summary


def _print_table(s: dict[str, Any], log) -> None:
  rows = [
      ("run", "steps", "verified", "violations", "clean acc", "ASR", "caught at"),
      ("honest", s["honest_steps"], s["honest_steps_verified"], s["honest_violations"],
       f"{s['honest_clean_accuracy']:.4f}", f"{s['honest_asr']:.4f}", "-"),
      ("attacked", s["attack_detected_at_step"] if s["attack_detected"] else s["honest_steps"],
       s["attack_steps_verified"], int(s["attack_detected"]), f"{s['attack_clean_accuracy_at_halt']:.4f}",
       f"{s['attack_asr_at_halt']:.4f}",
       s["attack_detected_at_step"] if s["attack_detected"] else "not caught"),
  ]
  widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
  for r in rows:
    log("  ".join(str(c).rjust(w) for c, w in zip(r, widths)))


def write_json(summary: dict[str, Any], path: str) -> None:
  with open(path, "w") as f:
    json.dump(summary, f, indent=2, sort_keys=True)
