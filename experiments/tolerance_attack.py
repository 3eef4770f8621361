"""Experiment 6: the tolerance-aware model-replacement attacker against three
tolerances -- the paper prototype's element-wise rule, the paper's two numbers
read as per-leaf normalised bounds (what this project called "paper prototype"
before issue 13), and the calibrated tolerance. Every malicious step is
verified (p = 1); the script reports violations caught, the ASR and clean
accuracy reached after k malicious steps, and k_min (ASR >= 90%) per tolerance,
next to whether the naive model-replacement and BadNets reports of the same
first step are caught.

Reproduce the committed results (about 15 minutes on 2 CPU cores):

    python experiments/tolerance_attack.py --out docs/results

A quick version (one seed, 100-step prefix, k up to 16):

    python experiments/tolerance_attack.py --out /tmp/quick --seeds 0 --prefix-steps 100 --max-k 16

With a GPU and CIFAR-10 in a local TFDS data_dir (calibrate on that GPU first;
`ginn calibrate` prints the tolerance to pass with --calibrated):

    python experiments/tolerance_attack.py --dataset cifar10 --data-dir ~/tensorflow_datasets \\
        --model vgg11 --batch-size 128 --lr 0.1 --calibrated '{"rel_l2": 1e-4, "max_abs": 1e-4}'
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

import ginn_jax as ginn
from ginn_jax._src.lab.common import (Lab, add_lab_args, calibrated_tolerance, figure, lab_config,
                                      save_experiment)
from ginn_jax._src.lab.stealth import tolerance_attack


@dataclasses.dataclass(frozen=True)
class Config:
  seeds: tuple = (0, 1)
  prefix_steps: int = 300  # Honest steps first, as in experiment 1.
  ks: tuple = (1, 2, 4, 8, 16, 32, 64, 128, 256)
  clip_value: float = 0.005  # The paper's element-wise C.
  target_steps: int = 300  # Poisoned steps that make the model-replacement target.
  direction: str = "model_replacement"


TINY = Config(seeds=(0,), prefix_steps=2, ks=(1, 2), target_steps=2)

LABELS = {
    "paper rule": "paper's rule: |a-b| < 0.01 max(|a|,|b|) or < 0.05, per element",
    "per-leaf 1e-2/5e-2": "per leaf: rel L2 1e-2, max-abs 5e-2 of the leaf's max",
    "calibrated": "calibrated (per leaf)",
}


def plot(result, path):
  with figure(path, ncols=2) as (ax_asr, ax_clean):
    for row in result["runs"]:
      ks = [c["k"] for c in row["curve"]]
      label = f"{row['tolerance']} (seed {row['seed']})"
      ax_asr.plot(ks, [c["asr"] for c in row["curve"]], marker="o", label=label)
      ax_clean.plot(ks, [c["clean_accuracy"] for c in row["curve"]], marker="o", label=label)
    for ax, name in ((ax_asr, "attack success rate"), (ax_clean, "clean accuracy")):
      ax.set_xscale("log", base=2)
      ax.set_xlabel("malicious steps k (every one verified, none caught)")
      ax.set_ylabel(name)
      ax.set_ylim(-0.02, 1.02)
    ax_asr.set_title(f"Tolerance-aware model replacement, C = {result['clip_value']:g}")
    ax_asr.legend(fontsize=7)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_lab_args(parser)
  parser.add_argument("--seeds", type=int, nargs="+", default=None)
  parser.add_argument("--prefix-steps", type=int, default=None, help="honest steps before the attack")
  parser.add_argument("--max-k", type=int, default=None, help="largest k (the grid is 1, 2, 4, ...)")
  parser.add_argument("--target-steps", type=int, default=None)
  parser.add_argument("--direction", choices=["model_replacement", "backdoor"], default=None)
  parser.add_argument("--calibrated", default=None, help="JSON tolerance; calibrated here if omitted")
  args = parser.parse_args(argv)
  cfg = TINY if args.tiny else Config()
  if args.seeds:
    cfg = dataclasses.replace(cfg, seeds=tuple(args.seeds))
  if args.prefix_steps is not None:
    cfg = dataclasses.replace(cfg, prefix_steps=args.prefix_steps)
  if args.max_k is not None:
    cfg = dataclasses.replace(cfg, ks=tuple(k for k in Config.ks if k <= args.max_k) or (args.max_k,))
  if args.target_steps is not None:
    cfg = dataclasses.replace(cfg, target_steps=args.target_steps)
  if args.direction:
    cfg = dataclasses.replace(cfg, direction=args.direction)
  lab = Lab(lab_config(args, eval_examples=200 if args.tiny else None))
  calibrated = calibrated_tolerance(lab, args.calibrated, clip="elementwise",
                                    clip_value=cfg.clip_value, tiny=args.tiny)
  tolerances = [("paper rule", ginn.PAPER_PROTOTYPE_TOLERANCE),
                ("per-leaf 1e-2/5e-2", ginn.LOOSE_PER_LEAF_TOLERANCE),
                ("calibrated", calibrated)]
  result = tolerance_attack(lab, tolerances, seeds=cfg.seeds, prefix_steps=cfg.prefix_steps, ks=cfg.ks,
                            clip_value=cfg.clip_value, target_steps=cfg.target_steps,
                            direction=cfg.direction, progress=not args.no_progress)
  result["labels"] = LABELS
  save_experiment(args.out, "tolerance_attack", result, lab=lab, config=cfg, argv=argv, plot=plot)
  for s in result["summary"]:
    print(f"{s['tolerance']:>20} ({s['describe']}): naive MR caught {s['naive_model_replacement_caught']} "
          f"(elements broken {s['naive_model_replacement_num_broken']}), BadNets caught "
          f"{s['naive_badnets_caught']} ({s['naive_badnets_num_broken']}); tolerance-aware: {s['aware_malicious_steps']} "
          f"malicious steps, {s['aware_steps_verified']} verified, {s['aware_violations']} violations; "
          f"ASR {s['final_asr']}, clean {s['final_clean_accuracy']}, k_min(90%) {s['k_min_90']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
