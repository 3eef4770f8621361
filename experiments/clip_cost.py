"""Experiment 2: the cost of clipping (clean accuracy vs C at a fixed step budget,
and the steps each C needs to recover the unclipped accuracy).

Reproduce the committed results (about 12 minutes on 2 CPU cores):

    python experiments/clip_cost.py --out docs/results

With a GPU and CIFAR-10 prepared in a local TFDS data_dir:

    python experiments/clip_cost.py --dataset cifar10 --data-dir ~/tensorflow_datasets \
        --model vgg11 --batch-size 128 --lr 0.1 --budget 5000 --max-steps 15000 --eval-every 1000
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

import ginn_jax  # noqa: F401  (before jax: two CPU devices)
from ginn_jax._src.lab.clip_cost import clip_cost
from ginn_jax._src.lab.common import Lab, add_lab_args, figure, lab_config, save_experiment


@dataclasses.dataclass(frozen=True)
class Config:
  clips: tuple = (("none", "none", None), ("C=0.01", "elementwise", 0.01),
                  ("C=0.005 (paper)", "elementwise", 0.005), ("C=0.001", "elementwise", 0.001),
                  ("C=0.0001", "elementwise", 0.0001))
  seeds: tuple = (0, 1)
  budget: int = 400
  max_steps: int = 1000
  eval_every: int = 200


TINY = Config(clips=(("none", "none", None), ("C=0.001", "elementwise", 0.001)), seeds=(0,),
              budget=4, max_steps=8, eval_every=4)


def plot(result, path):
  with figure(path) as ax:
    for s in result["settings"]:
      steps = [t for t, _ in s["runs"][0]["curve"]]
      mean = [sum(r["curve"][i][1] for r in s["runs"]) / len(s["runs"]) for i in range(len(steps))]
      ax.plot(steps, mean, marker="o", label=s["name"])
    ax.axvline(result["budget_steps"], color="grey", ls=":", label="budget")
    ax.set_xlabel("training step"), ax.set_ylabel("clean test accuracy")
    ax.set_title("Cost of element-wise clipping (mean over seeds)")
    ax.legend(fontsize=8)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_lab_args(parser)
  parser.add_argument("--budget", type=int, default=None)
  parser.add_argument("--max-steps", type=int, default=None)
  parser.add_argument("--eval-every", type=int, default=None)
  args = parser.parse_args(argv)
  cfg = TINY if args.tiny else Config()
  cfg = dataclasses.replace(cfg, **{k: v for k, v in dict(
      budget=args.budget, max_steps=args.max_steps, eval_every=args.eval_every).items() if v is not None})
  lab = Lab(lab_config(args, eval_examples=200 if args.tiny else None))
  result = clip_cost(lab, cfg.clips, seeds=cfg.seeds, budget_steps=cfg.budget, max_steps=cfg.max_steps,
                     eval_every=cfg.eval_every, progress=not args.no_progress)
  save_experiment(args.out, "clip_cost", result, lab=lab, config=cfg, argv=argv, plot=plot)
  for s in result["settings"]:
    print(f"{s['name']:>18}: accuracy at {cfg.budget} steps {s['accuracy_at_budget']:.4f}; "
          f"steps to recover: {[r['steps_to_recover'] for r in s['runs']]}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
