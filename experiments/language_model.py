"""Experiment 8: a language model, verified; a backdoor in it, unverified and verified.

A 2-layer decoder-only transformer in flax NNX learns Python's help texts
(``pydoc_data.topics``, shipped with Python: 465 KB of English, offline) one
character at a time, from an untrusted worker, with Adam after the trusted
clip. Runs: honest at p = 0.1 (calibrated tolerance); a backdoor attacker on
every step that writes the trigger "open sesame" and the continuation
": rm -rf /" into 4 of the 32 windows of each batch, at p = 0 (its attack
success rate on test prompts; also at clip 0.1, and with 1 window poisoned per
batch) and at p = 0.1 (caught; the model at the halt is not released); the same
attacker with every step's witness checked (p = 0, p_witness = 1: caught at its
first step), and the trusted check cost per step of witness checks against
re-computation at that integrity.

Reproduce the committed results (about 10 minutes on 2 CPU cores):

    python experiments/language_model.py --out docs/results
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

import ginn_jax  # noqa: F401  (before jax: two CPU devices)
from ginn_jax._src.lab.common import figure, save_experiment
from ginn_jax._src.lab.language_model import LMConfig, language_model_runs

Config = LMConfig

# p = 1: the attacker is caught within 4 steps. No dropout, no calibration: fewer and faster compiles.
TINY = LMConfig(d_model=16, num_heads=2, num_layers=1, dropout=0.0, context=32, batch_size=8, steps=4,
                eval_every=2, asr_prompts=16, prefix_len=8, calibration_steps=0, train_windows=256,
                test_windows=32, extra_clip_values=(), extra_num_poison=(), p=1.0, witness_steps=2)


def plot(result, path):
  runs = [("honest, p=0.1", result["honest_verified"]), ("backdoor, p=0", result["attack_unverified"]),
          *((f"backdoor, p=0, clip {c['clip_value']}", c) for c in result["attack_unverified_clips"]),
          *((f"backdoor, p=0, {r['num_poison']} poisoned/batch", r) for r in result.get("attack_unverified_rates", [])),
          ("backdoor, p=0.1", result["attack_verified"]),
          *((("backdoor, p_witness=1", result["attack_witness"]),) if "attack_witness" in result else ())]
  with figure(path, ncols=2) as (ax_ppl, ax_asr):
    for label, run in runs:
      steps = [c["step"] for c in run["curve"]]
      ax_ppl.plot(steps, [c["perplexity"] for c in run["curve"]], marker="o", label=label)
      ax_asr.plot(steps, [c["asr"] for c in run["curve"]], marker="o", label=label)
      if run["violation"] is not None:
        ax_asr.axvline(run["violation"]["step"], ls="--", color="k", lw=1)
        ax_asr.annotate(f"caught at step {run['violation']['step']}", (run["violation"]["step"], 0.5),
                        fontsize=8, rotation=90, ha="right")
    ax_ppl.set_xlabel("training step"), ax_ppl.set_ylabel("test perplexity (characters)")
    ax_ppl.set_yscale("log"), ax_ppl.set_title("Clean test perplexity")
    ax_asr.set_xlabel("training step"), ax_asr.set_ylabel("attack success rate"), ax_asr.set_ylim(-0.02, 1.02)
    ax_asr.set_title('"open sesame" -> ": rm -rf /"')
    ax_asr.legend(fontsize=8)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="docs/results", help="folder for the JSON and PNG")
  parser.add_argument("--tiny", action="store_true", help="a few steps only (smoke test)")
  parser.add_argument("--no-progress", action="store_true")
  parser.add_argument("--steps", type=int, default=None)
  parser.add_argument("--clip-value", type=float, default=None, help="the trusted clip (global norm)")
  parser.add_argument("--extra-clip-values", type=float, nargs="*", default=None,
                      help="more clip values for the unverified attacker")
  parser.add_argument("--num-poison", type=int, default=None, help="windows poisoned per batch")
  parser.add_argument("--extra-num-poison", type=int, nargs="*", default=None,
                      help="more poisoning rates for the unverified attacker")
  args = parser.parse_args(argv)
  cfg = TINY if args.tiny else LMConfig()
  for name in ("steps", "clip_value", "num_poison"):
    if getattr(args, name) is not None:
      cfg = dataclasses.replace(cfg, **{name: getattr(args, name)})
  if args.extra_clip_values is not None:
    cfg = dataclasses.replace(cfg, extra_clip_values=tuple(args.extra_clip_values))
  if args.extra_num_poison is not None:
    cfg = dataclasses.replace(cfg, extra_num_poison=tuple(args.extra_num_poison))
  result = language_model_runs(cfg, progress=not args.no_progress)
  save_experiment(args.out, "language_model", result, lab=None, config=cfg, argv=argv, plot=plot)
  s = result["summary"]
  print(f"honest, verified at p={cfg.p}: test perplexity {s['honest_perplexity']:.3f} after {cfg.steps} steps "
        f"({s['honest_steps_verified']} steps re-computed, released: {s['honest_verified']})")
  print(f"backdoor, unverified: ASR {s['unverified_asr']:.3f} (control {s['unverified_control']:.3f}), "
        f"clean perplexity {s['unverified_perplexity']:.3f}; ASR by clip {s['unverified_asr_by_clip']}, "
        f"by windows poisoned per batch {s['unverified_asr_by_num_poison']} "
        f"(unigram baseline perplexity {s['unigram_perplexity']:.3f})")
  print(f"backdoor, verified at p={cfg.p}: caught {s['verified_caught']} at step {s['verified_caught_at_step']}, "
        f"released: {s['verified_released']}")
  print(f"backdoor, every step's witness checked (p=0, p_witness=1): caught at step "
        f"{s['witness_caught_at_step']} (first malicious step {s['witness_first_malicious_step']}); "
        f"trusted check per step {s['witness_check_ms']:.1f} ms by witness against "
        f"{s['recompute_check_ms']:.1f} ms by re-computation ({s['witness_check_ratio']:.1f}x cheaper)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
