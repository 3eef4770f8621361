"""Experiments 5 and 6: attackers that stay inside the verification tolerance.

Experiment 5 (`stealth_runs`): the stealth worker reports the honest gradient
plus the largest push towards the backdoor that a per-leaf tolerance lets
through, on every step, for a whole run. Verification cannot catch it by
construction; the question is how far it gets.

Experiment 6 (`tolerance_attack`): after an honest prefix, the tolerance-aware
model-replacement attacker (`ToleranceAwareWorker`) takes over for k steps,
every one of them verified (p = 1), under several tolerances (the paper's
element-wise rule, per-leaf ones); next to it, the naive model-replacement
report of the same step, which shows what the tolerance catches.
"""
from __future__ import annotations

from typing import Any, Sequence

from ginn_jax._src import progress as progress_lib

from ginn_jax._src.lab.common import Lab
from ginn_jax._src.loop import train
from ginn_jax._src.trusted.verify import Tolerance
from ginn_jax._src.worker.attacks import (ModelReplacementWorker, StealthWorker, ToleranceAwareWorker,
                                          make_backdoored_params)
from ginn_jax._src.worker.honest import HonestWorker
from ginn_jax._src.worker.malicious import Backdoor, BackdoorWorker
from ginn_jax._src.worker.schedules import FromStep


def stealth_runs(lab: Lab, tolerances: Sequence[tuple[str, Tolerance]], *, seeds: Sequence[int],
                 steps: int, p: float, clip: str, clip_value: float | None,
                 eval_every: int, progress: bool = True) -> dict[str, Any]:
  """Honest and stealth-attacked runs at each tolerance (verification at rate p).

  Returns:
    {"runs": [{seed, tolerance name, rel_l2, max_abs, violations, verified
    steps, curve: [{step, clean_accuracy, asr, robust_accuracy}]}], "honest": [...]}
  """
  backdoor = Backdoor(trigger=lab.trigger, target=lab.cfg.target, poison_fraction=1.0)
  honest = HonestWorker(lab.model, *lab.train_data)
  bar = progress_lib.bar(total=len(seeds) * (len(tolerances) + 1) * steps, desc="stealth", enabled=progress)
  out = {"runs": [], "honest": []}
  for seed in seeds:
    cases = [("honest", None)] + list(tolerances)
    for name, tol in cases:
      rt = lab.runtime(seed=seed, p=p, clip=clip, clip_value=clip_value, tolerance=tol)
      worker = honest if tol is None else StealthWorker(
          lab.model, *lab.train_data, schedule=FromStep(0), tolerance=tol, backdoor=backdoor)
      curve = []
      for s in range(eval_every, steps + 1, eval_every):
        res = train(rt, worker, eval_every, progress=False, raise_on_violation=False)
        bar.update(eval_every)
        curve.append({"step": s, **lab.evaluate(rt.state.params)})
        if res.violation is not None:
          break
      row = {"seed": seed, "tolerance": name, "violations": rt.num_violations,
             "steps_verified": rt.num_verified, "steps": rt.step, "curve": curve,
             **({} if tol is None else tol.to_dict())}
      (out["honest"] if tol is None else out["runs"]).append(row)
  bar.close()
  return out


def _k_min(curve: list[dict[str, Any]], level: float) -> int | None:
  return next((r["k"] for r in curve if r["asr"] >= level and r["violations"] == 0), None)


def _violation(v) -> dict[str, Any] | None:
  if v is None:
    return None
  out = {"step": v.step, "leaf": v.leaf, "error": dict(v.error)}
  if v.breaks:
    out["num_broken"] = sum(b["count"] for b in v.breaks)
    out["leaves_broken"] = [{"leaf": b["leaf"], "count": b["count"], "size": b["size"]} for b in v.breaks]
  return out


def tolerance_attack(lab: Lab, tolerances: Sequence[tuple[str, Tolerance]], *, seeds: Sequence[int],
                     prefix_steps: int, ks: Sequence[int], clip_value: float, target_steps: int,
                     direction: str = "model_replacement", progress: bool = True) -> dict[str, Any]:
  """The tolerance-aware attacker against each tolerance, every malicious step verified.

  Per seed: `prefix_steps` honest steps (element-wise clip `clip_value`,
  p = 0), a backdoored target trained from there (`make_backdoored_params`,
  `target_steps` poisoned steps), then per tolerance: (1) the naive
  `ModelReplacementWorker` and BadNets (`BackdoorWorker`, the lab's
  poisoning) for one step each at p = 1 (is it caught, and by how many
  elements); (2) the `ToleranceAwareWorker` for k = ks[-1] steps at
  p = 1, evaluated at each k of `ks` (it stops at a violation).

  Returns:
    {"runs": [{seed, tolerance, rule, clean_before, asr_before, naive:
    {model_replacement: {caught, violation}, badnets: ...}, curve: [{k, asr, clean_accuracy, robust_accuracy,
    steps_verified, violations}], k_min: {50, 90}}], "summary": per
    tolerance: k_min per seed, violations, steps verified, final ASR and
    clean accuracy per seed}
  """
  backdoor = Backdoor(trigger=lab.trigger, target=lab.cfg.target, poison_fraction=lab.cfg.poison_fraction)
  triggered = Backdoor(trigger=lab.trigger, target=lab.cfg.target, poison_fraction=1.0)
  x, y = lab.train_data
  ks = sorted(ks)
  bar = progress_lib.bar(total=len(seeds) * (prefix_steps + target_steps + len(tolerances) * (2 + ks[-1])),
             desc="tolerance attack", enabled=progress)
  common = dict(clip="elementwise", clip_value=clip_value)
  runs = []
  for seed in seeds:
    base = lab.runtime(seed=seed, p=0.0, **common)
    train(base, HonestWorker(lab.model, x, y), prefix_steps, progress=False)
    before = lab.evaluate(base.state.params)
    target = make_backdoored_params(lab.model, x, y, backdoor=backdoor, params=base.state.params,
                                    seed=seed, steps=target_steps, batch_size=lab.cfg.batch_size,
                                    learning_rate=lab.cfg.learning_rate)
    bar.update(prefix_steps + target_steps)
    for name, tol in tolerances:
      naive = {}
      for naive_name, worker in (
          ("model_replacement", ModelReplacementWorker(lab.model, x, y, schedule=FromStep(0),
                                                       target_params=target, clip_value=clip_value)),
          ("badnets", BackdoorWorker(lab.model, x, y, schedule=FromStep(0), trigger=backdoor.trigger,
                                     target=backdoor.target, poison_fraction=backdoor.poison_fraction))):
        rt = lab.runtime(seed=seed, p=1.0, tolerance=tol, state=base.state, **common)
        res = train(rt, worker, 1, progress=False, raise_on_violation=False)
        naive[naive_name] = {"caught": res.violation is not None, "violation": _violation(res.violation)}
        bar.update(1)
      rt = lab.runtime(seed=seed, p=1.0, tolerance=tol, state=base.state, **common)
      attacker = ToleranceAwareWorker(lab.model, x, y, schedule=FromStep(0), tolerance=tol,
                                      direction=direction, target_params=target, clip_value=clip_value,
                                      backdoor=triggered)
      curve, done = [], 0
      for k in ks:
        step = train(rt, attacker, k - done, progress=False, raise_on_violation=False)
        bar.update(k - done)
        done = k
        curve.append({"k": k, **lab.evaluate(rt.state.params), "steps_verified": rt.num_verified,
                      "violations": rt.num_violations})
        if step.violation is not None:
          break
      runs.append({"seed": seed, "tolerance": name, "rule": tol.to_dict(), "describe": tol.describe(),
                   "clean_before": before["clean_accuracy"], "asr_before": before["asr"],
                   "naive": naive,
                   "aware_violation": _violation(rt.halted), "curve": curve,
                   "k_min": {"50": _k_min(curve, 0.5), "90": _k_min(curve, 0.9)}})
  bar.close()
  summary = []
  for name, tol in tolerances:
    rs = [r for r in runs if r["tolerance"] == name]
    k90 = [r["k_min"]["90"] for r in rs]
    summary.append({
        "tolerance": name, "rule": tol.to_dict(), "describe": tol.describe(),
        **{f"naive_{a}_caught": [r["naive"][a]["caught"] for r in rs] for a in ("model_replacement", "badnets")},
        **{f"naive_{a}_num_broken": [(r["naive"][a]["violation"] or {}).get("num_broken") for r in rs]
           for a in ("model_replacement", "badnets")},
        "aware_malicious_steps": [r["curve"][-1]["k"] for r in rs],
        "aware_steps_verified": [r["curve"][-1]["steps_verified"] for r in rs],
        "aware_violations": [r["curve"][-1]["violations"] for r in rs],
        "final_asr": [r["curve"][-1]["asr"] for r in rs],
        "final_clean_accuracy": [r["curve"][-1]["clean_accuracy"] for r in rs],
        "k_min_90": k90, "k_min_50": [r["k_min"]["50"] for r in rs],
        "not_reached_by_k": None if all(k is not None for k in k90) else ks[-1],
    })
  return {"runs": runs, "summary": summary, "ks": ks, "prefix_steps": prefix_steps,
          "target_steps": target_steps, "clip_value": clip_value, "direction": direction}
