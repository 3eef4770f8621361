"""Experiment 2: what a clip bound costs in clean accuracy and in steps."""
from __future__ import annotations

from typing import Any, Sequence

from ginn_jax._src import progress as progress_lib

from ginn_jax._src.lab.common import Lab
from ginn_jax._src.loop import train
from ginn_jax._src.worker.honest import HonestWorker


def clip_cost(lab: Lab, clips: Sequence[tuple[str, str, float | None]], *, seeds: Sequence[int],
              budget_steps: int, max_steps: int, eval_every: int, recover_margin: float = 0.005,
              progress: bool = True) -> dict[str, Any]:
  """Clean accuracy curves for each clip setting.

  Args:
    lab: data and model.
    clips: (name, mode, C) per setting; include ("none", "none", None) as the baseline.
    seeds: public training seeds (each setting runs every seed).
    budget_steps: the common step budget the accuracies are compared at.
    max_steps: train this long to see how many steps each C needs to recover.
    eval_every: evaluate every this many steps (budget_steps must be a multiple).
    recover_margin: "recovered" means within this of the unclipped accuracy at the budget.

  Returns:
    {"settings": [{name, mode, C, seeds: [{seed, curve: [[step, acc], ...]}],
      accuracy_at_budget (mean), steps_to_recover (per seed, None if never)}], "baseline": ...}
  """
  worker = HonestWorker(lab.model, *lab.train_data)
  runs = {}
  bar = progress_lib.bar(total=len(clips) * len(seeds) * max_steps, desc="clip cost", enabled=progress)
  for name, mode, value in clips:
    for seed in seeds:
      rt = lab.runtime(seed=seed, clip=mode, clip_value=value)
      curve = []
      for step in range(eval_every, max_steps + 1, eval_every):
        train(rt, worker, eval_every, progress=False)
        curve.append([step, lab.evaluate(rt.state.params)["clean_accuracy"]])
        bar.update(eval_every)
      runs[name, seed] = curve
  bar.close()
  at = lambda curve, s: next(a for t, a in curve if t == s)  # noqa: E731
  baseline = {seed: at(runs["none", seed], budget_steps) for seed in seeds} if ("none", seeds[0]) in runs else None
  settings = []
  for name, mode, value in clips:
    per_seed = []
    for seed in seeds:
      curve = runs[name, seed]
      recover = None
      if baseline is not None:
        recover = next((t for t, a in curve if a >= baseline[seed] - recover_margin), None)
      per_seed.append({"seed": seed, "curve": curve, "steps_to_recover": recover})
    accs = [at(r["curve"], budget_steps) for r in per_seed]
    settings.append({"name": name, "mode": mode, "C": value, "runs": per_seed,
                     "accuracy_at_budget": sum(accs) / len(accs),
                     "accuracy_at_budget_spread": [min(accs), max(accs)]})
  return {"settings": settings, "baseline_at_budget": baseline, "budget_steps": budget_steps,
          "max_steps": max_steps, "recover_margin": recover_margin}
