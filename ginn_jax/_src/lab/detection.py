"""Experiment 3: empirical detection rate of real protocol runs vs 1-(1-p)^k."""
from __future__ import annotations

import hashlib
from typing import Any, Sequence

from ginn_jax._src import progress as progress_lib

from ginn_jax._src import analysis
from ginn_jax._src.lab.common import Lab, wilson_interval
from ginn_jax._src.loop import train
from ginn_jax._src.worker.malicious import BackdoorWorker
from ginn_jax._src.worker.schedules import Steps


def detection_rates(lab: Lab, cases: Sequence[tuple[float, int]], *, trials: int, seed: int = 0,
                    clip_value: float = 0.01, progress: bool = True) -> list[dict[str, Any]]:
  """For each (p, k): `trials` real runs, each with a fresh audit secret, in
  which a BadNets worker is malicious on steps 0..k-1. A trial counts as
  detected if the trusted runtime raised an integrity violation.

  Returns:
    One row per case: p, k, trials, detected, rate, expected, 99% Wilson
    interval, whether the expectation lies inside it, mean detection step.
  """
  rows = []
  bar = progress_lib.bar(total=len(cases) * trials, desc="detection", enabled=progress)
  for p, k in cases:
    attacker = BackdoorWorker(lab.model, *lab.train_data, schedule=Steps(range(k)),
                              target=lab.cfg.target, trigger=lab.trigger,
                              poison_fraction=lab.cfg.poison_fraction)
    detected, at = 0, []
    for trial in range(trials):
      secret = hashlib.sha256(f"detection/{seed}/{p}/{k}/{trial}".encode()).digest()
      rt = lab.runtime(seed=seed, p=p, clip="elementwise", clip_value=clip_value, secret=secret)
      res = train(rt, attacker, k, progress=False, raise_on_violation=False)
      if res.violation is not None:
        detected += 1
        at.append(res.violation.step)
      bar.update(1)
    rows.append(detection_row(p, k, trials=trials, detected=detected, steps=at))
  bar.close()
  return rows


def detection_row(p: float, k: int, *, trials: int, detected: int,
                  steps: Sequence[int] = ()) -> dict[str, Any]:
  """One row of `detection_rates`: `detected` of `trials` runs caught (at
  `steps`), with the rate's 99% Wilson interval, which contains the rate for
  every count (0.0 and 1.0 exactly at 0 and at `trials`)."""
  lo, hi = wilson_interval(detected, trials)
  expected = analysis.detection_probability(p, k)
  return {"p": p, "k": k, "trials": trials, "detected": detected, "rate": detected / trials,
          "expected": expected, "ci99": [lo, hi], "expected_inside_ci": lo <= expected <= hi,
          "mean_detection_step": sum(steps) / len(steps) if steps else None}
