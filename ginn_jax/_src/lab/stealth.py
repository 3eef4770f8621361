"""Experiment 5: an attacker that stays inside the verification tolerance.

The stealth worker reports the honest gradient plus the largest push towards
the backdoor that the tolerance lets through, on every step, for a whole
run. Verification cannot catch it by construction; the question is how far it
gets. This is where the method can fail.
"""
from __future__ import annotations

from typing import Any, Sequence

from tqdm.auto import tqdm

from ginn_jax._src.lab.common import Lab
from ginn_jax._src.loop import train
from ginn_jax._src.trusted.verify import Tolerance
from ginn_jax._src.worker.attacks import StealthWorker
from ginn_jax._src.worker.honest import HonestWorker
from ginn_jax._src.worker.malicious import Backdoor
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
  bar = tqdm(total=len(seeds) * (len(tolerances) + 1) * steps, desc="stealth", disable=not progress)
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
