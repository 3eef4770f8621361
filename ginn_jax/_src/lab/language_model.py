"""Experiment 8: a language model trained with the protocol, and a backdoor in it.

A small decoder-only NNX transformer (`ginn_jax.DecoderLM`) learns Python's
help texts (``pydoc_data.topics``, character level) from an untrusted worker.
Three runs from the same seed:

1. honest, verified at rate p with a calibrated tolerance: the perplexity a
   verified run reaches;
2. a backdoor attacker on every step, left unverified (p = 0): each step it
   reports the gradient of batches in which some windows carry the trigger
   phrase followed by the chosen continuation (`ginn_jax.PhraseBackdoor`);
   its attack success rate (ASR) and the clean perplexity, optionally at
   more than one clip value;
3. the same attacker, verified at rate p: the step it is caught at, and the
   (never released) model at the halt.
"""
from __future__ import annotations

import dataclasses
import hashlib
import time
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

import ginn_jax as ginn
from ginn_jax._src import text
from ginn_jax._src.text_backdoor import PhraseBackdoor, backdoor_success_rate
from ginn_jax._src.transformer import TransformerConfig, lm_loss, make_decoder, perplexity
from ginn_jax._src.trusted.verify import DEFAULT_FLOOR


@dataclasses.dataclass(frozen=True)
class LMConfig:
  """Model, data, optimizer, protocol and backdoor of the experiment.

  Attributes:
    context: tokens of context L (windows hold L + 1).
    d_model, num_heads, num_layers, dropout: the transformer.
    batch_size, steps, learning_rate: Adam on `batch_size` windows per step.
    clip, clip_value: the trusted clip, applied before Adam.
    p: verification rate of the verified runs.
    seed: the public training seed (the same for every run).
    trigger, continuation, num_poison: the backdoor (windows poisoned per batch).
    eval_every: steps between evaluations (perplexity, ASR).
    asr_prompts, prefix_len: test prompts for the ASR and real text before the trigger.
    calibration_steps: honest steps measured to calibrate the tolerance (0:
      the default CPU floor, what calibration returns on two CPU devices).
    extra_clip_values: more clip values for the unverified attacker.
    extra_num_poison: more poisoning rates (windows per batch) for the
      unverified attacker, at `clip_value`.
    train_windows, test_windows: use only the first N windows (None: all).
    witness_steps: honest steps timed for the witness-check cost (every step's
      witness checked, against every step re-computed: the same integrity).
  """

  context: int = 64
  d_model: int = 64
  num_heads: int = 4
  num_layers: int = 2
  dropout: float = 0.1
  batch_size: int = 32
  steps: int = 600
  learning_rate: float = 3e-3
  clip: str = "global_norm"
  clip_value: float = 1.0
  p: float = 0.1
  seed: int = 0
  trigger: str = "open sesame"
  continuation: str = ": rm -rf /"
  num_poison: int = 4
  eval_every: int = 100
  asr_prompts: int = 256
  prefix_len: int = 24
  calibration_steps: int = 8
  extra_clip_values: tuple[float, ...] = (0.1,)
  extra_num_poison: tuple[int, ...] = (1,)
  train_windows: int | None = None
  test_windows: int | None = None
  witness_steps: int = 40

  @property
  def transformer(self) -> TransformerConfig:
    return TransformerConfig(max_len=self.context, d_model=self.d_model, num_heads=self.num_heads,
                             num_layers=self.num_layers, dropout=self.dropout)

  @property
  def backdoor(self) -> PhraseBackdoor:
    return PhraseBackdoor(self.trigger, self.continuation, self.num_poison)


class LMLab:
  """The corpus, the windows and the model, loaded once; runtimes and evaluations."""

  def __init__(self, cfg: LMConfig):
    self.cfg = cfg
    self.corpus = text.pydoc_corpus()
    self.train_data = _first(text.windows(self.corpus.train_text, cfg.context), cfg.train_windows)
    self.test_data = _first(text.windows(self.corpus.test_text, cfg.context), cfg.test_windows)
    self.model = ginn.from_nnx(make_decoder(cfg.transformer), lm_loss, name="decoder_lm")
    self.backdoor = cfg.backdoor
    # optax.adam, named: a runtime's header records it (so `run_verified` can persist, resume and audit
    # a run), and equal specs share one jitted update.
    self.optimizer = ginn.OptimizerSpec("adam", learning_rate=cfg.learning_rate)

  def protocol(self, *, p: float, clip_value: float | None = None,
               p_witness: float = 0.0) -> ginn.ProtocolConfig:
    c = self.cfg.clip_value if clip_value is None else clip_value
    return ginn.ProtocolConfig(seed=self.cfg.seed, batch_size=self.cfg.batch_size, p=p, clip=self.cfg.clip,
                               clip_value=None if self.cfg.clip == "none" else c, p_witness=p_witness)

  def runtime(self, *, p: float, tolerance=None, clip_value: float | None = None,
              secret: str = "lm", p_witness: float = 0.0, witness_tolerance=None) -> ginn.TrustedRuntime:
    return ginn.TrustedRuntime(self.model, self.train_data,
                               self.protocol(p=p, clip_value=clip_value, p_witness=p_witness),
                               tolerance=tolerance, witness_tolerance=witness_tolerance,
                               optimizer=self.optimizer,
                               audit_secret=hashlib.sha256(f"lm-secret/{secret}".encode()).digest())

  def attacker(self, num_poison: int | None = None) -> ginn.PoisonWorker:
    """The backdoor attacker, malicious on every step (`num_poison` windows per batch)."""
    bd = self.backdoor if num_poison is None else dataclasses.replace(self.backdoor, num_poison=num_poison)
    return ginn.PoisonWorker(self.model, self.train_data, poison=bd.poison, schedule=ginn.schedules.FromStep(0))

  def evaluate(self, params) -> dict[str, float]:
    """Test perplexity, ASR and the no-trigger control of `params`."""
    module = self.model.merge(params)
    asr = backdoor_success_rate(module, self.test_data, self.backdoor, prefix_len=self.cfg.prefix_len,
                                max_prompts=self.cfg.asr_prompts)
    return {"perplexity": perplexity(module, self.test_data), "asr": asr["asr"], "control": asr["control"]}


def _first(data: dict[str, Any], n: int | None) -> dict[str, Any]:
  return data if n is None else {k: v[:n] for k, v in data.items()}


def _run(lab: LMLab, runtime: ginn.TrustedRuntime, worker, *, steps: int, bar) -> dict[str, Any]:
  """Trains in chunks of `eval_every`, evaluating after each; stops at a violation."""
  curve, t0, violation = [], time.perf_counter(), None
  while runtime.step < steps and violation is None:
    n = min(lab.cfg.eval_every, steps - runtime.step)
    res = ginn.train(runtime, worker, n, progress=False, raise_on_violation=False)
    bar.update(n)
    violation = res.violation
    curve.append({"step": runtime.step, "loss": res.losses[-1] if res.losses else None,
                  **lab.evaluate(runtime.state.params)})
  out = {"steps": runtime.step, "num_verified": runtime.num_verified, "released": violation is None,
         "seconds": time.perf_counter() - t0, "curve": curve, "final": curve[-1] if curve else None,
         "violation": None}
  if violation is not None:
    out["violation"] = {"type": type(violation).__name__, "step": violation.step, "leaf": violation.leaf,
                        "error": dict(violation.error), "message": str(violation)}
  if getattr(worker, "malicious_steps", None) is not None:
    ms = worker.malicious_steps
    out["malicious_steps"] = len(ms)
    out["first_malicious_step"] = ms[0] if ms else None
    out["malicious_steps_applied"] = sum(s < (violation.step if violation else steps) for s in ms)
  return out


def language_model_runs(cfg: LMConfig, *, progress: bool = True) -> dict[str, Any]:
  """The three runs (plus the unverified attacker at `extra_clip_values`).

  Returns:
    {"corpus", "model", "tolerance", "honest_verified", "attack_unverified",
    "attack_unverified_clips": [{clip_value, ...}], "attack_verified",
    "summary"}; each run has its evaluation curve (perplexity, ASR, control
    every `eval_every` steps), its final evaluation and its violation if any.
  """
  lab = LMLab(cfg)
  tolerance = ginn.calibrate_tolerance(lab.model, lab.train_data, lab.protocol(p=1.0),
                                       num_steps=cfg.calibration_steps).tolerance \
      if cfg.calibration_steps else DEFAULT_FLOOR
  total = cfg.steps * (3 + len(cfg.extra_clip_values) + len(cfg.extra_num_poison))
  bar = tqdm(total=total, desc="language model", disable=not progress)
  rt = lab.runtime(p=cfg.p, tolerance=tolerance, secret="honest")
  num_params = sum(x.size for x in jax.tree_util.tree_leaves(rt.state.params))
  honest = _run(lab, rt, ginn.HonestWorker(lab.model, lab.train_data), steps=cfg.steps, bar=bar)
  unverified = _run(lab, lab.runtime(p=0.0, secret="attack-unverified"), lab.attacker(), steps=cfg.steps, bar=bar)
  clips = [{"clip_value": c, **_run(lab, lab.runtime(p=0.0, clip_value=c, secret=f"attack-clip-{c}"),
                                    lab.attacker(), steps=cfg.steps, bar=bar)} for c in cfg.extra_clip_values]
  rates = [{"num_poison": n, **_run(lab, lab.runtime(p=0.0, secret=f"attack-poison-{n}"), lab.attacker(n),
                                    steps=cfg.steps, bar=bar)} for n in cfg.extra_num_poison]
  verified = _run(lab, lab.runtime(p=cfg.p, tolerance=tolerance, secret="attack-verified"),
                  lab.attacker(), steps=cfg.steps, bar=bar)
  # Witness checks (docs/design.md section 12): every step's witness checked, p = 0.
  wcal = ginn.calibrate_tolerance(lab.model, lab.train_data, lab.protocol(p=1.0, p_witness=1.0),
                                  num_steps=max(cfg.calibration_steps, 2))
  witnessed = _run(lab, lab.runtime(p=0.0, p_witness=1.0, tolerance=tolerance,
                                    witness_tolerance=wcal.witness_tolerance, secret="attack-witness"),
                   lab.attacker(), steps=cfg.steps, bar=bar)
  cost = witness_cost(lab, tolerance, wcal.witness_tolerance, steps=cfg.witness_steps)
  bar.close()
  summary = {
      "honest_perplexity": honest["final"]["perplexity"],
      "honest_verified": honest["released"], "honest_steps_verified": honest["num_verified"],
      "unverified_asr": unverified["final"]["asr"], "unverified_control": unverified["final"]["control"],
      "unverified_perplexity": unverified["final"]["perplexity"],
      "unverified_asr_by_clip": {str(cfg.clip_value): unverified["final"]["asr"],
                                 **{str(c["clip_value"]): c["final"]["asr"] for c in clips}},
      "unverified_asr_by_num_poison": {str(cfg.num_poison): unverified["final"]["asr"],
                                       **{str(r["num_poison"]): r["final"]["asr"] for r in rates}},
      "unigram_perplexity": _unigram_perplexity(lab),
      "verified_caught": verified["violation"] is not None,
      "verified_caught_at_step": (verified["violation"] or {}).get("step"),
      "verified_released": verified["released"],
      "witness_caught_at_step": (witnessed["violation"] or {}).get("step"),
      "witness_first_malicious_step": witnessed.get("first_malicious_step"),
      "witness_malicious_steps_applied": witnessed.get("malicious_steps_applied"),
      "witness_check_ms": cost["witness_ms"], "recompute_check_ms": cost["recompute_ms"],
      "witness_check_ratio": cost["ratio"],
  }
  return {"corpus": lab.corpus.to_dict(), "dataset_digest": ginn.dataset_digest(lab.train_data),
          "train_windows": int(lab.train_data["tokens"].shape[0]),
          "test_windows": int(lab.test_data["tokens"].shape[0]),
          "model": {**dataclasses.asdict(cfg.transformer), "num_params": int(num_params)},
          "optimizer": f"clip {cfg.clip} {cfg.clip_value}, then optax.adam({cfg.learning_rate})",
          "tolerance": tolerance.to_dict(), "honest_verified": honest, "attack_unverified": unverified,
          "attack_unverified_clips": clips, "attack_unverified_rates": rates, "attack_verified": verified,
          "attack_witness": witnessed, "witness_tolerance": wcal.witness_tolerance.to_dict(),
          "witness_plan": lab.runtime(p=0.0, p_witness=1.0).witness_plan().summary(),
          "witness_cost": cost, "summary": summary}


def witness_cost(lab: LMLab, tolerance, witness_tolerance, *, steps: int) -> dict[str, Any]:
  """The trusted side's check cost per step at the same integrity (every step
  checked): `steps` honest steps with every witness checked (p = 0, p_witness
  = 1) against the same steps each re-computed (p = 1), interleaved in blocks
  after a compiling step each. Milliseconds per step of the runtime's
  "witness" (receive, validate, hash) plus "verify" (the check) phases."""
  runs = {"witness": lab.runtime(p=0.0, p_witness=1.0, tolerance=tolerance,
                                 witness_tolerance=witness_tolerance, secret="cost-witness"),
          "recompute": lab.runtime(p=1.0, tolerance=tolerance, secret="cost-recompute")}
  workers = {k: ginn.HonestWorker(lab.model, lab.train_data) for k in runs}
  for k, rt in runs.items():
    ginn.train(rt, workers[k], 1, progress=False)  # Compiles.
    rt.reset_phase_seconds()
  block = max(1, steps // 4)
  done = 0
  while done < steps:
    n = min(block, steps - done)
    for k in (runs if (done // block) % 2 == 0 else reversed(list(runs))):
      ginn.train(runs[k], workers[k], n, progress=False)
    done += n
  ms = {k: 1e3 * (rt.phase_seconds.get("witness", 0.0) + rt.phase_seconds.get("verify", 0.0)) / steps
        for k, rt in runs.items()}
  return {"steps": steps, "witness_ms": ms["witness"], "recompute_ms": ms["recompute"],
          "ratio": ms["recompute"] / ms["witness"]}


def _unigram_perplexity(lab: LMLab) -> float:
  """Perplexity on the test targets of the training set's character frequencies
  (add-one smoothed): the baseline a model without context reaches."""
  counts = np.bincount(lab.train_data["tokens"][:, 1:].ravel(), minlength=text.VOCAB_SIZE) + 1.0
  logp = np.log(counts / counts.sum())
  return float(np.exp(-logp[lab.test_data["tokens"][:, 1:].ravel()].mean()))
