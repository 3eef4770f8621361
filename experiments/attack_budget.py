"""Experiment 1: the attack budget. ASR as a function of the number of malicious
steps k, for clip bounds none / loose / narrow / the paper's C = 0.005, for the
BadNets and the model-replacement attackers, with the malicious steps at the
end of training and in the middle (followed by honest steps).

Loose and narrow are chosen from the distribution of honest gradient entries
(|g| quantiles 99.9% and 90% after the honest prefix, unclipped).

Reproduce the committed results (about 15 minutes on 2 CPU cores):

    python experiments/attack_budget.py --out docs/results

With a GPU and CIFAR-10 in a local TFDS data_dir:

    python experiments/attack_budget.py --dataset cifar10 --data-dir ~/tensorflow_datasets \
        --model vgg11 --batch-size 128 --lr 0.1 --prefix 5000
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

import ginn_jax  # noqa: F401  (before jax: two CPU devices)
from ginn_jax._src.lab.budget import attack_budget, gradient_quantiles
from ginn_jax._src.lab.common import Lab, add_lab_args, figure, lab_config, save_experiment


@dataclasses.dataclass(frozen=True)
class Config:
  seeds: tuple = (0, 1)
  prefix: int = 300
  ks: tuple = (1, 2, 4, 8, 16, 32, 64, 128, 256)
  middle_ks: tuple = (8, 32, 128)
  middle_honest_steps: int = 150
  loose_quantile: str = "q0.999"
  narrow_quantile: str = "q0.9"
  paper_C: float = 0.005


TINY = Config(seeds=(0,), prefix=3, ks=(1, 2), middle_ks=(2,), middle_honest_steps=2)


def plot(result, path):
  attackers = sorted({r["attacker"] for r in result["runs"]})
  with figure(path, ncols=len(attackers)) as axes:
    for ax, attacker in zip(axes if len(attackers) > 1 else [axes], attackers):
      for clip in dict.fromkeys(r["clip"] for r in result["runs"]):
        rs = [r for r in result["runs"] if r["clip"] == clip and r["attacker"] == attacker]
        ks = [e["k"] for e in rs[0]["end"]]
        asr = [sum(r["end"][i]["asr"] for r in rs) / len(rs) for i in range(len(ks))]
        line, = ax.plot(ks, asr, marker="o", label=f"{clip} (end)")
        if rs[0]["middle"]:
          mk = [e["k"] for e in rs[0]["middle"]]
          masr = [sum(r["middle"][i]["asr"] for r in rs) / len(rs) for i in range(len(mk))]
          ax.plot(mk, masr, marker="x", ls="--", color=line.get_color(), label=f"{clip} (middle)")
      ax.set_xscale("log", base=2), ax.set_ylim(-0.02, 1.02)
      ax.axhline(0.9, color="grey", ls=":"), ax.axhline(0.5, color="grey", ls=":")
      ax.set_xlabel("malicious steps k"), ax.set_ylabel("attack success rate")
      ax.set_title(f"{attacker}: ASR vs k (mean over seeds)")
      ax.legend(fontsize=7)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_lab_args(parser)
  parser.add_argument("--prefix", type=int, default=None, help="honest steps before the attack")
  args = parser.parse_args(argv)
  cfg = TINY if args.tiny else Config()
  if args.prefix:
    cfg = dataclasses.replace(cfg, prefix=args.prefix)
  lab = Lab(lab_config(args, eval_examples=200 if args.tiny else None))
  quantiles = gradient_quantiles(lab, seed=0, warmup_steps=cfg.prefix, sample_steps=2 if args.tiny else 20)
  clips = (("none", "none", None),
           (f"loose C={quantiles[cfg.loose_quantile]:.2g}", "elementwise", quantiles[cfg.loose_quantile]),
           (f"paper C={cfg.paper_C}", "elementwise", cfg.paper_C),
           (f"narrow C={quantiles[cfg.narrow_quantile]:.2g}", "elementwise", quantiles[cfg.narrow_quantile]))
  result = attack_budget(lab, clips, seeds=cfg.seeds, prefix_steps=cfg.prefix, ks=cfg.ks,
                         middle_ks=cfg.middle_ks, middle_honest_steps=cfg.middle_honest_steps,
                         progress=not args.no_progress)
  result["gradient_quantiles"] = quantiles
  save_experiment(args.out, "attack_budget", result, lab=lab, config=cfg, argv=argv, plot=plot)
  print("honest |g| quantiles:", {k: f"{v:.3g}" for k, v in quantiles.items()})
  for s in result["summary"]:
    print(f"{s['clip']:>22} {s['attacker']:>17} {s['placement']:>6} ASR>={s['level']}%: "
          f"k_min per seed {s['k_min_per_seed']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
