"""Experiment 3: empirical detection rate of real protocol runs against 1-(1-p)^k.

For each p in {0.5, 0.1, 0.05, 0.01} and k around 1/p, many real runs (fresh
audit secret each) with a BadNets worker malicious on k steps; the rate of
runs halted by an integrity violation, with a 99% Wilson interval.

Reproduce the committed results (about 5 minutes on 2 CPU cores; the tiny MLP
keeps each step cheap: detection depends on the coins, not on the model):

    python experiments/detection.py --out docs/results
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

import ginn_jax  # noqa: F401  (before jax: two CPU devices)
from ginn_jax._src.lab.common import (Lab, add_lab_args, error_bars, figure, lab_config,
                                      save_experiment)
from ginn_jax._src.lab.detection import detection_rates


@dataclasses.dataclass(frozen=True)
class Config:
  cases: tuple = ((0.5, 1), (0.5, 3), (0.1, 5), (0.1, 20), (0.05, 10), (0.05, 40),
                  (0.01, 50), (0.01, 150))
  trials: int = 200


TINY = Config(cases=((0.5, 2), (0.1, 3)), trials=5)


def plot(result, path):
  rows = result["rows"]
  with figure(path) as ax:
    for p in sorted({r["p"] for r in rows}, reverse=True):
      rs = [r for r in rows if r["p"] == p]
      ks = [r["k"] for r in rs]
      rates = [r["rate"] for r in rs]
      # Each 99% interval contains its rate (wilson_interval), so both bars are >= 0.
      bars = ax.errorbar(ks, rates, yerr=error_bars(rates, [r["ci99"] for r in rs]),
                         fmt="o", capsize=3, label=f"measured, p={p}")
      kk = list(range(1, max(ks) + 1))
      ax.plot(kk, [1 - (1 - p) ** k for k in kk], lw=1, color=bars[0].get_color())
    ax.set_xscale("log"), ax.set_xlabel("malicious steps k"), ax.set_ylabel("detection rate")
    ax.set_title("Detection: real runs (99% CI) vs 1-(1-p)^k (lines)")
    ax.legend(fontsize=8)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_lab_args(parser, model="mlp")
  parser.add_argument("--trials", type=int, default=None)
  args = parser.parse_args(argv)
  cfg = TINY if args.tiny else Config()
  if args.trials:
    cfg = dataclasses.replace(cfg, trials=args.trials)
  lab = Lab(lab_config(args))
  rows = detection_rates(lab, cfg.cases, trials=cfg.trials, progress=not args.no_progress)
  save_experiment(args.out, "detection", {"rows": rows}, lab=lab, config=cfg, argv=argv, plot=plot)
  for r in rows:
    print(f"p={r['p']:<5} k={r['k']:<4} rate {r['rate']:.3f} (99% CI {r['ci99'][0]:.3f}-{r['ci99'][1]:.3f}) "
          f"expected {r['expected']:.3f} {'inside' if r['expected_inside_ci'] else 'OUTSIDE'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
