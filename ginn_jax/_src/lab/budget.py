"""Experiment 1: how many malicious steps k a backdoor needs, per clip bound.

From an honestly trained state (the same clip during honest training), an
attacker takes over for k steps. Two placements:

* end: no honest step follows (the attacker's best case);
* middle: `middle_honest_steps` honest steps follow, which may erase the
  backdoor; we measure how much survives.

k_min(50%) and k_min(90%) are the smallest k on the grid whose ASR reaches
those levels (None if the largest k does not).
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from ginn_jax._src import progress as progress_lib

from ginn_jax._src.lab.common import Lab
from ginn_jax._src.loop import train
from ginn_jax._src.worker.attacks import ModelReplacementWorker, make_backdoored_params
from ginn_jax._src.worker.honest import HonestWorker
from ginn_jax._src.worker.malicious import Backdoor, BackdoorWorker
from ginn_jax._src.worker.schedules import FromStep

ATTACKERS = ("badnets", "model_replacement")


def gradient_quantiles(lab: Lab, *, seed: int, warmup_steps: int, sample_steps: int,
                       qs: Sequence[float] = (0.5, 0.9, 0.99, 0.999)) -> dict[str, float]:
  """Quantiles of honest |gradient| entries over `sample_steps` reports after
  `warmup_steps` unclipped steps: the data a narrow C is chosen from."""
  rt = lab.runtime(seed=seed)
  worker = HonestWorker(lab.model, *lab.train_data)
  train(rt, worker, warmup_steps, progress=False)
  mags = []
  for _ in range(sample_steps):
    report = worker(rt.next_order())
    mags.append(np.concatenate([np.abs(np.asarray(jax.device_get(g))).ravel()
                                for g in jax.tree_util.tree_leaves(report.grads)]))
    rt.submit(report)
  allm = np.concatenate(mags)
  return {f"q{q:g}": float(np.quantile(allm, q)) for q in qs}


def _attacker(name: str, lab: Lab, backdoor: Backdoor, mode: str, value, params, seed: int):
  x, y = lab.train_data
  if name == "badnets":
    return BackdoorWorker(lab.model, x, y, schedule=FromStep(0), trigger=backdoor.trigger,
                          target=backdoor.target, poison_fraction=backdoor.poison_fraction)
  if name == "model_replacement":
    target = make_backdoored_params(lab.model, x, y, backdoor=backdoor, params=params, seed=seed,
                                    steps=300, batch_size=lab.cfg.batch_size,
                                    learning_rate=lab.cfg.learning_rate)
    return ModelReplacementWorker(lab.model, x, y, schedule=FromStep(0), target_params=target,
                                  clip=mode, clip_value=value, learning_rate=lab.cfg.learning_rate)
  raise ValueError(f"unknown attacker {name!r}; choose from {ATTACKERS}")


def _k_min(curve: list[dict[str, Any]], level: float) -> int | None:
  return next((r["k"] for r in curve if r["asr"] >= level), None)


def attack_budget(lab: Lab, clips: Sequence[tuple[str, str, float | None]], *, seeds: Sequence[int],
                  prefix_steps: int, ks: Sequence[int], middle_ks: Sequence[int],
                  middle_honest_steps: int, attackers: Sequence[str] = ATTACKERS,
                  progress: bool = True) -> dict[str, Any]:
  """ASR as a function of k for each clip setting, attacker and placement.

  Returns:
    {"runs": [{seed, clip, mode, C, attacker, clean_before, end: [{k, asr,
    clean_accuracy, robust_accuracy}], middle: [...], k_min_end: {50, 90},
    k_min_middle: {50, 90}}], "summary": per (clip, attacker, placement):
    k_min per seed, median and spread}
  """
  backdoor = Backdoor(trigger=lab.trigger, target=lab.cfg.target, poison_fraction=lab.cfg.poison_fraction)
  honest = HonestWorker(lab.model, *lab.train_data)
  ks = sorted(ks)
  total = len(seeds) * len(clips) * (prefix_steps + len(attackers) * (ks[-1] + len(middle_ks) * middle_honest_steps))
  bar = progress_lib.bar(total=total, desc="attack budget", enabled=progress)
  runs = []
  for seed in seeds:
    for name, mode, value in clips:
      base = lab.runtime(seed=seed, clip=mode, clip_value=value)
      train(base, honest, prefix_steps, progress=False)
      bar.update(prefix_steps)
      clean_before = lab.evaluate(base.state.params)
      for attacker_name in attackers:
        attacker = _attacker(attacker_name, lab, backdoor, mode, value, base.state.params, seed)
        rt = lab.runtime(seed=seed, clip=mode, clip_value=value, state=base.state)
        end, middle, done = [], [], 0
        for k in ks:
          train(rt, attacker, k - done, progress=False)
          bar.update(k - done)
          done = k
          end.append({"k": k, **lab.evaluate(rt.state.params)})
          if k in middle_ks:
            after = lab.runtime(seed=seed, clip=mode, clip_value=value, state=rt.state)
            train(after, honest, middle_honest_steps, progress=False)
            bar.update(middle_honest_steps)
            middle.append({"k": k, **lab.evaluate(after.state.params)})
        runs.append({"seed": seed, "clip": name, "mode": mode, "C": value, "attacker": attacker_name,
                     "clean_before": clean_before, "end": end, "middle": middle,
                     "k_min_end": {"50": _k_min(end, 0.5), "90": _k_min(end, 0.9)},
                     "k_min_middle": {"50": _k_min(middle, 0.5), "90": _k_min(middle, 0.9)}})
  bar.close()
  summary = summarize(runs, ks=ks, middle_ks=middle_ks)
  return {"runs": runs, "summary": summary, "ks": ks, "middle_ks": list(middle_ks),
          "middle_honest_steps": middle_honest_steps, "prefix_steps": prefix_steps}


def summarize(runs: list[dict[str, Any]], *, ks: Sequence[int], middle_ks: Sequence[int]) -> list[dict[str, Any]]:
  """k_min per (clip, attacker, placement, level): per seed, median and range.

  ``not_reached_by_k`` is the largest k tried in that placement (the "end"
  grid `ks`, or `middle_ks`) when some seed did not reach the level.
  """
  summary = []
  largest = {"end": max(ks), "middle": max(middle_ks) if middle_ks else None}
  for name in dict.fromkeys(r["clip"] for r in runs):
    for attacker_name in dict.fromkeys(r["attacker"] for r in runs):
      rs = [r for r in runs if r["clip"] == name and r["attacker"] == attacker_name]
      for placement in ("end", "middle"):
        for level in ("50", "90"):
          vals = [r[f"k_min_{placement}"][level] for r in rs]
          found = sorted(v for v in vals if v is not None)
          summary.append({"clip": name, "C": rs[0]["C"], "attacker": attacker_name, "placement": placement,
                          "level": int(level), "k_min_per_seed": vals,
                          "k_min_median": found[len(found) // 2] if len(found) == len(vals) else None,
                          "k_min_range": [found[0], found[-1]] if found else None,
                          "not_reached_by_k": None if len(found) == len(vals) else largest[placement]})
  return summary
