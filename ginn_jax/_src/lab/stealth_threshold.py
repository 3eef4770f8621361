"""Experiment 7: the stealth threshold, the tolerance at which an attacker that
stays inside it plants a backdoor (issue 14).

A sweep over tolerances t (per leaf, ``rel_l2 = max_abs = t``): at each t an
attacker runs every step of a whole run, and the run's ASR and clean accuracy
are recorded. The threshold t* is the first t (in increasing order) at which
ASR reaches a level (50%).

Cost. A stealth step computes two gradients on the worker (the honest one and
the backdoor direction); a verified step adds a third on the trusted side. The
attacker's construction keeps every report within 90% of the tolerance, so
verification cannot change what it does: the training runs use p = 0, and a
*probe* confirms that: from the run's parameters at each evaluation point it
forks a few steps in which every report is both re-computed and
witness-checked, with unbounded tolerances, and records the worst error each
check saw as a share of t (re-computation: at most 0.9 by construction; the
witness check's Freivalds projections are measured, not assumed).

Attackers are looked up by name in `ATTACKERS` (``register_attacker`` adds
one), so a tolerance-aware model-replacement attacker can join the sweep
without changing it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, Sequence

from ginn_jax._src.lab.common import Lab
from ginn_jax._src.loop import train
from ginn_jax._src.trusted import verify
from ginn_jax._src.trusted.runtime import TrustedRuntime
from ginn_jax._src.worker.attacks import StealthWorker
from ginn_jax._src.worker.honest import HonestWorker, Worker
from ginn_jax._src.worker.malicious import Backdoor
from ginn_jax._src.worker.schedules import FromStep

DEFAULT_TOLERANCES = (1e-3, 3e-3, 1e-2, 2e-2, 3e-2, 5e-2, 1e-1)
ASR_LEVEL = 0.5

AttackerFactory = Callable[[Lab, verify.Tolerance], Worker]
ATTACKERS: dict[str, AttackerFactory] = {}


def register_attacker(name: str, factory: AttackerFactory) -> None:
  """Makes ``factory(lab, tolerance) -> worker`` available to the sweep as `name`.

  The worker should be malicious on every step and aim to stay inside
  `tolerance` (the public verification tolerance of the run).
  """
  ATTACKERS[name] = factory


def _stealth(lab: Lab, tol: verify.Tolerance) -> Worker:
  backdoor = Backdoor(trigger=lab.trigger, target=lab.cfg.target, poison_fraction=1.0)
  return StealthWorker(lab.model, *lab.train_data, schedule=FromStep(0), tolerance=tol,
                       backdoor=backdoor)


register_attacker("stealth", _stealth)


def _probe(lab: Lab, state, worker: Worker, *, seed: int, clip: str, clip_value: float | None,
           steps: int) -> dict[str, float | None]:
  """Forks `steps` steps from `state` with every report re-computed and, for a
  layered model, witness-checked (unbounded tolerances: errors are measured,
  nothing halts). Returns the worst error of each check."""
  cfg = dataclasses.replace(lab.protocol(seed=seed, p=1.0, clip=clip, clip_value=clip_value),
                            p_witness=1.0, witness_timeout_s=None)
  rt = TrustedRuntime(lab.model, *lab.train_data, cfg, tolerance=verify.UNBOUNDED,
                      witness_tolerance=verify.UNBOUNDED,
                      audit_secret=f"stealth-threshold-probe-{seed}-{state.step}".encode())
  rt.restore(state, [], 0)
  entries = [e for e in train(rt, worker, steps, progress=False).transcript if e.kind == "step"]

  def worst(name):
    vals = [getattr(e, name) for e in entries if getattr(e, name) is not None]
    return max(vals) if vals else None

  return {"steps": len(entries), **{n: worst(n) for n in
                                    ("max_rel_l2", "max_abs", "witness_rel_l2", "witness_max_abs")}}


def threshold_run(lab: Lab, attacker: str, t: float | None, *, seed: int, steps: int,
                  clip: str, clip_value: float | None, eval_every: int,
                  probe_steps: int = 0) -> dict[str, Any]:
  """One run of `attacker` at tolerance t (``rel_l2 = max_abs = t``), or an
  honest run when `attacker` is "honest" (t ignored), trained with p = 0.

  Returns:
    {attacker, t, seed, steps, curve: [{step, clean_accuracy, asr,
    robust_accuracy, probe?}], asr, clean_accuracy (at the last step),
    probe_worst: the worst error ratio (error / t) each check saw in the probes}
  """
  rt = lab.runtime(seed=seed, p=0.0, clip=clip, clip_value=clip_value)
  if attacker == "honest":
    worker, tol = HonestWorker(lab.model, *lab.train_data), None
  else:
    if attacker not in ATTACKERS:
      raise ValueError(f"unknown attacker {attacker!r}; registered: {sorted(ATTACKERS)}")
    tol = verify.Tolerance(rel_l2=t, max_abs=t)
    worker = ATTACKERS[attacker](lab, tol)
  curve = []
  for s in range(eval_every, steps + 1, eval_every):
    train(rt, worker, eval_every, progress=False)
    point = {"step": s, **lab.evaluate(rt.state.params)}
    if probe_steps and tol is not None:
      point["probe"] = _probe(lab, rt.state, worker, seed=seed, clip=clip, clip_value=clip_value,
                              steps=probe_steps)
    curve.append(point)
  row = {"attacker": attacker, "t": None if tol is None else t, "seed": seed, "steps": rt.step,
         "curve": curve, "asr": curve[-1]["asr"], "clean_accuracy": curve[-1]["clean_accuracy"]}
  if tol is not None and probe_steps:
    row["probe_worst"] = probe_ratios(curve, t)
  return row


def probe_ratios(curve: Sequence[dict[str, Any]], t: float) -> dict[str, float | None]:
  """The worst error / t seen by each check over a run's probes."""
  out = {}
  for name in ("max_rel_l2", "max_abs", "witness_rel_l2", "witness_max_abs"):
    vals = [c["probe"][name] for c in curve if c.get("probe") and c["probe"][name] is not None]
    out[name] = max(vals) / t if vals else None
  return out


def find_threshold(points: Iterable[tuple[float, float]], level: float = ASR_LEVEL) -> dict[str, Any]:
  """The first tolerance whose ASR reaches `level`, scanning t upwards.

  Args:
    points: (t, asr) pairs (one seed, or the mean over seeds per t).
    level: the ASR that counts as a planted backdoor.

  Returns:
    {"t_star": the first measured t with ASR >= level (None if none),
    "bracket": [largest t below it with ASR < level, t_star] (either None when
    missing), "t_interp": t where the straight line through the bracket's two
    (log10 t, ASR) points crosses `level` (None without a full bracket),
    "monotone": whether ASR never falls as t grows, "level"}.
  """
  pts = sorted((float(t), float(a)) for t, a in points)
  monotone = all(a1 <= a2 for (_, a1), (_, a2) in zip(pts, pts[1:]))
  i = next((k for k, (_, a) in enumerate(pts) if a >= level), None)
  if i is None:
    return {"t_star": None, "bracket": [pts[-1][0] if pts else None, None], "t_interp": None,
            "monotone": monotone, "level": level}
  t_star, a_star = pts[i]
  if i == 0:
    return {"t_star": t_star, "bracket": [None, t_star], "t_interp": None, "monotone": monotone,
            "level": level}
  t_lo, a_lo = pts[i - 1]
  frac = (level - a_lo) / (a_star - a_lo)
  t_interp = 10 ** (math.log10(t_lo) + frac * (math.log10(t_star) - math.log10(t_lo)))
  # Inside the bracket, and t_star itself at ASR == level: 10 ** log10(t) rounds
  # (10 ** log10(0.02) is 0.020000000000000004, above its own bracket).
  t_interp = t_star if frac >= 1.0 else min(max(t_interp, t_lo), t_star)
  return {"t_star": t_star, "bracket": [t_lo, t_star], "t_interp": t_interp, "monotone": monotone,
          "level": level}


def summarize(runs: Sequence[dict[str, Any]], *, attacker: str, seed: int,
              level: float = ASR_LEVEL) -> dict[str, Any]:
  """t* of `attacker`, from its runs on the primary `seed` and from the mean
  ASR over every seed run at each t; the reported one is the lower of the two
  (the more cautious), and both are kept.

  Returns:
    `find_threshold`'s keys for the reported t*, plus "from" ("seed <n>" or
    "mean over seeds"), "primary_seed" and "mean_over_seeds" (each one's own
    `find_threshold` result), and "bracket_runs": every run at the reported
    bracket's tolerances.
  """
  own = [r for r in runs if r["attacker"] == attacker and r["t"] is not None]
  empty = {"t_star": None, "bracket": [None, None], "t_interp": None, "monotone": True, "level": level}
  primary = [(r["t"], r["asr"]) for r in own if r["seed"] == seed]
  by_t: dict[float, list[float]] = {}
  for r in own:
    by_t.setdefault(r["t"], []).append(r["asr"])
  mean = [(t, sum(a) / len(a)) for t, a in by_t.items()]
  one = find_threshold(primary, level) if primary else dict(empty)
  avg = find_threshold(mean, level) if mean else dict(empty)

  def ref(th):
    t = th["t_interp"] if th["t_interp"] is not None else th["t_star"]
    return float("inf") if t is None else t

  out = dict(avg if ref(avg) < ref(one) else one)
  out["from"] = "mean over seeds" if ref(avg) < ref(one) else f"seed {seed}"
  out["primary_seed"], out["mean_over_seeds"] = one, avg
  out["bracket_runs"] = [{"seed": r["seed"], "t": r["t"], "asr": r["asr"],
                          "clean_accuracy": r["clean_accuracy"]}
                         for r in own if r["t"] in out["bracket"]]
  return out


def sweep(lab: Lab, *, attackers: Sequence[str], tolerances: Sequence[float], seed: int,
          extra_seeds: Sequence[int], steps: int, clip: str, clip_value: float | None,
          eval_every: int, probe_steps: int, honest: bool,
          done: Sequence[dict[str, Any]] = (),
          on_run: Callable[[list[dict[str, Any]]], None] | None = None,
          log: Callable[[str], None] = print) -> list[dict[str, Any]]:
  """Every attacker at every tolerance (in the order given) on `seed`, then at
  the two tolerances around its threshold on each of `extra_seeds`, then one
  honest run; runs already in `done` (same attacker, t, seed, steps) are kept.

  `on_run(runs)` is called after every run (to write partial results).
  """
  runs = list(done)
  key = lambda r: (r["attacker"], r["t"], r["seed"], r["steps"])  # noqa: E731
  have = {key(r) for r in runs}

  def run(attacker, t, s):
    if (attacker, t, s, steps) in have:
      return
    row = threshold_run(lab, attacker, t, seed=s, steps=steps, clip=clip, clip_value=clip_value,
                        eval_every=eval_every, probe_steps=probe_steps)
    runs.append(row)
    have.add(key(row))
    log(f"{attacker} t={t} seed {s}: ASR {row['asr']:.4f}, clean {row['clean_accuracy']:.4f}"
        + (f", probe {row['probe_worst']}" if "probe_worst" in row else ""))
    if on_run is not None:
      on_run(runs)

  for attacker in attackers:
    for t in tolerances:
      run(attacker, float(t), seed)
  for attacker in attackers:
    mine = [r for r in runs if r["attacker"] == attacker and r["steps"] == steps]
    bracket = summarize(mine, attacker=attacker, seed=seed)["primary_seed"]["bracket"]
    for s in extra_seeds:
      for t in bracket:
        if t is not None:
          run(attacker, t, s)
  if honest:
    run("honest", None, seed)
  return runs


def step_seconds(lab: Lab, *, t: float, seed: int, clip: str, clip_value: float | None,
                 steps: int, warmup: int = 5) -> dict[str, Any]:
  """Seconds per step of the stealth attacker (p = 0 and p = 0.1) and of an
  honest worker (p = 0), after `warmup` steps and with verification compiled,
  with the runtime's phase times.

  Where a stealth step's time goes: its worker computes two gradients (the
  honest one and the backdoor direction), and the trusted side waits for the
  report in its "validate" phase; each re-computed step adds one gradient on
  the trusted side.
  """
  import time

  out = {}
  cases = [("stealth, p=0", "stealth", 0.0), ("stealth, p=0.1", "stealth", 0.1),
           ("honest, p=0", "honest", 0.0)]
  for name, attacker, p in cases:
    rt = lab.runtime(seed=seed, p=p, clip=clip, clip_value=clip_value,
                     tolerance=verify.Tolerance(rel_l2=t, max_abs=t))
    worker = (HonestWorker(lab.model, *lab.train_data) if attacker == "honest"
              else ATTACKERS[attacker](lab, verify.Tolerance(rel_l2=t, max_abs=t)))
    train(rt, worker, warmup, progress=False)
    rt.compile_verification()  # The first re-computation would otherwise pay for compiling it.
    rt.reset_phase_seconds()
    start = time.perf_counter()
    res = train(rt, worker, steps, progress=False)
    out[name] = {"seconds_per_step": (time.perf_counter() - start) / steps,
                 "verified_steps": res.num_verified, "steps": steps,
                 "phase_seconds_per_step": {k: v / steps for k, v in rt.phase_seconds.items()}}
  return out
