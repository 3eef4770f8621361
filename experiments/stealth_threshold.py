"""Experiment 7: the stealth threshold. Sweeps the verification tolerance t
(``rel_l2 = max_abs = t``) for an attacker that stays inside it on every step,
reports ASR and clean accuracy per t, and finds t*, the first t whose ASR
reaches 50% (with the bracketing pair and a log-linear interpolation).

Training runs use p = 0 (the attacker passes every check by construction);
probes fork a few fully verified steps (re-computation and witness check) at
each evaluation point and record the worst error each check saw, as a share
of t. Results are written after every run, so a partial sweep is kept;
``--resume`` skips the runs already in the JSON.

Reproduce the committed results (about an hour on 2 CPU cores):

    python experiments/stealth_threshold.py --out docs/results --resume \\
        --store ginn_jax/_src/thresholds.json

Where a step's time goes (stealth at p = 0 and 0.1, honest; 40 steps each):

    python experiments/stealth_threshold.py --time-steps 40

Quick check (two tolerances, a few steps):

    python experiments/stealth_threshold.py --tiny --out /tmp/st
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import shlex
import sys

from ginn_jax._src.lab.common import (Lab, add_lab_args, figure, lab_config, save_experiment,
                                      write_results)
from ginn_jax._src.lab.stealth_threshold import (ASR_LEVEL, DEFAULT_TOLERANCES, step_seconds, summarize,
                                                 sweep)
from ginn_jax._src.thresholds import store_threshold

NAME = "stealth_threshold"


@dataclasses.dataclass(frozen=True)
class Config:
  attackers: tuple = ("stealth",)
  tolerances: tuple = DEFAULT_TOLERANCES
  seed: int = 0
  extra_seeds: tuple = (1,)
  steps: int = 1000
  eval_every: int = 250
  probe_steps: int = 3
  clip: str = "elementwise"
  clip_value: float = 0.01
  honest: bool = True


TINY = Config(tolerances=(1e-3, 1e-1), extra_seeds=(), steps=4, eval_every=2, probe_steps=1,
              honest=False)


def plot(result, path):
  with figure(path) as ax:
    for attacker in result["config"]["attackers"]:
      for seed in sorted({r["seed"] for r in result["runs"] if r["attacker"] == attacker}):
        rows = sorted((r for r in result["runs"] if r["attacker"] == attacker and r["seed"] == seed),
                      key=lambda r: r["t"])
        ts = [r["t"] for r in rows]
        ax.plot(ts, [r["asr"] for r in rows], marker="o", label=f"{attacker} ASR (seed {seed})")
        ax.plot(ts, [r["clean_accuracy"] for r in rows], marker="x", ls="--",
                label=f"{attacker} clean accuracy (seed {seed})")
      th = result["thresholds"].get(attacker, {})
      if th.get("t_star") is not None:
        ax.axvline(th["t_star"], color="grey", ls=":", label=f"t* = {th['t_star']:g} ({attacker})")
    ax.axhline(result["config"].get("level", ASR_LEVEL), color="lightgrey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("tolerance t (rel_l2 = max_abs = t, per leaf)")
    ax.set_ylabel(f"at step {result['config']['steps']}"), ax.set_ylim(-0.02, 1.02)
    ax.set_title("Stealth attacker inside the tolerance, every step")
    ax.legend(fontsize=7)


def _result(runs, cfg) -> dict:
  primary = [r for r in runs if r["steps"] == cfg.steps]
  thresholds = {a: summarize(primary, attacker=a, seed=cfg.seed) for a in cfg.attackers}
  have = {(r["attacker"], r["t"], r["seed"]) for r in primary}
  planned = [(a, float(t), cfg.seed) for a in cfg.attackers for t in cfg.tolerances]
  planned += [(a, t, s) for a in cfg.attackers for s in cfg.extra_seeds
              for t in thresholds[a]["primary_seed"]["bracket"] if t is not None]
  planned += [("honest", None, cfg.seed)] if cfg.honest else []
  return {"runs": [r for r in primary if r["attacker"] != "honest"],
          "honest": [r for r in primary if r["attacker"] == "honest"], "thresholds": thresholds,
          "missing_runs": [{"attacker": a, "t": t, "seed": s} for a, t, s in planned if (a, t, s) not in have]}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_lab_args(parser)
  parser.add_argument("--steps", type=int, default=None, help="steps per run (default 1000)")
  parser.add_argument("--tolerances", default=None,
                      help="comma-separated t, run in this order (default 1e-3,...,1e-1)")
  parser.add_argument("--attackers", default=None, help="comma-separated registered attackers")
  parser.add_argument("--seed", type=int, default=None, help="the primary seed (default 0)")
  parser.add_argument("--extra-seeds", default=None,
                      help="comma-separated seeds run at the two t around the threshold ('' for none)")
  parser.add_argument("--eval-every", type=int, default=None)
  parser.add_argument("--probe-steps", type=int, default=None,
                      help="fully verified steps forked at each evaluation point")
  parser.add_argument("--no-honest", action="store_true", help="skip the honest baseline run")
  parser.add_argument("--resume", action="store_true", help="keep the runs already in the JSON")
  parser.add_argument("--replot", action="store_true", help="only redo the summary and plot")
  parser.add_argument("--time-steps", type=int, default=None, metavar="N",
                      help="only time N steps (stealth at p=0 and 0.1, honest); prints JSON")
  parser.add_argument("--store", default=None, metavar="PATH",
                      help="record t* in this stored-threshold file (e.g. ginn_jax/_src/thresholds.json)")
  args = parser.parse_args(argv)
  cfg = TINY if args.tiny else Config()
  over = {}
  if args.steps:
    over["steps"] = args.steps
  if args.tolerances:
    over["tolerances"] = tuple(float(t) for t in args.tolerances.split(","))
  if args.attackers:
    over["attackers"] = tuple(args.attackers.split(","))
  if args.seed is not None:
    over["seed"] = args.seed
  if args.extra_seeds is not None:
    over["extra_seeds"] = tuple(int(s) for s in args.extra_seeds.split(",") if s.strip())
  if args.eval_every:
    over["eval_every"] = args.eval_every
  if args.probe_steps is not None:
    over["probe_steps"] = args.probe_steps
  if args.no_honest:
    over["honest"] = False
  cfg = dataclasses.replace(cfg, **over)
  out = pathlib.Path(args.out)
  path = out / f"{NAME}.json"
  stored = json.loads(path.read_text()) if (args.resume or args.replot) and path.exists() else {}
  done = stored.get("all_runs", [])
  command = shlex.join(["python", f"experiments/{NAME}.py", *(argv if argv is not None else sys.argv[1:])])
  # Every invocation that added runs (a sweep may be split, e.g. to run the points that matter first).
  commands = stored.get("commands", []) + ([] if args.replot else [command])
  lab = Lab(lab_config(args, eval_examples=200 if args.tiny else None))
  if args.time_steps:
    print(json.dumps(step_seconds(lab, t=2e-2, seed=cfg.seed, clip=cfg.clip, clip_value=cfg.clip_value,
                                  steps=args.time_steps), indent=2))
    return 0

  def partial(runs):
    write_results(path, {**_result(runs, cfg), "all_runs": runs, "partial": True,
                         "config": dataclasses.asdict(cfg), "lab": dataclasses.asdict(lab.cfg),
                         "experiment": NAME, "command": command, "commands": commands})

  runs = done if args.replot else sweep(
      lab, attackers=cfg.attackers, tolerances=cfg.tolerances, seed=cfg.seed,
      extra_seeds=cfg.extra_seeds, steps=cfg.steps, clip=cfg.clip, clip_value=cfg.clip_value,
      eval_every=cfg.eval_every, probe_steps=cfg.probe_steps, honest=cfg.honest, done=done,
      on_run=partial, log=lambda s: print(s, flush=True))
  result = {**_result(runs, cfg), "all_runs": runs, "commands": commands}
  result["partial"] = bool(result["missing_runs"])
  if args.replot and "command" in stored:  # Keep the command that made the runs.
    argv = shlex.split(stored["command"])[2:]
  save_experiment(out, NAME, result, lab=lab, config=cfg, argv=argv, plot=plot)
  if args.store:
    for attacker in cfg.attackers:
      store_threshold(args.store, result, attacker=attacker, train_data=lab.train_data)
  print(table(result))
  for attacker, th in result["thresholds"].items():
    print(f"{attacker}: t* = {th['t_star']} (bracket {th['bracket']}, interpolated {th['t_interp']})")
  return 0


def _t(t) -> str:
  return "-" if t is None else f"{t:g}"


def table(result) -> str:
  """The results as a Markdown table (one row per run, by attacker and t)."""
  runs = result["runs"] + result["honest"]
  steps = "/".join(str(c["step"]) for c in runs[0]["curve"]) if runs else ""
  rows = [f"| attacker | t | seed | ASR at steps {steps} | clean accuracy at the end | "
          "worst error / t, re-computation (rel L2, max-abs) | worst error / t, witness check |",
          "|---|---|---|---|---|---|---|"]
  fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
  for r in sorted(runs,
                  key=lambda r: (r["attacker"] == "honest", r["attacker"], r["t"] or 0, r["seed"])):
    pw = r.get("probe_worst", {})
    rows.append(f"| {r['attacker']} | {_t(r['t'])} | {r['seed']} | "
                + ", ".join(f"{c['asr']:.3f}" for c in r["curve"])
                + f" | {r['clean_accuracy']:.3f} | {fmt(pw.get('max_rel_l2'))}, {fmt(pw.get('max_abs'))} | "
                f"{fmt(pw.get('witness_rel_l2'))}, {fmt(pw.get('witness_max_abs'))} |")
  return "\n".join(rows)


if __name__ == "__main__":
  sys.exit(main())
