"""One smoke test per experiment: the real script, a tiny config, checked JSON."""
import importlib.util
import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_script(name, out, *extra):
  spec = importlib.util.spec_from_file_location(f"experiments_{name}", ROOT / "experiments" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[f"experiments_{name}"] = module  # dataclasses look their module up.
  spec.loader.exec_module(module)
  assert module.main(["--tiny", "--no-progress", "--out", str(out), *extra]) == 0
  assert (out / f"{name}.png").stat().st_size > 1000
  return json.loads((out / f"{name}.json").read_text())


def test_detection(tmp_path):
  res = run_script("detection", tmp_path)
  assert res["experiment"] == "detection"
  for row in res["rows"]:
    assert row["trials"] == 5 and 0 <= row["detected"] <= 5
    assert row["expected"] == pytest.approx(1 - (1 - row["p"]) ** row["k"])
    assert row["ci99"][0] <= row["rate"] <= row["ci99"][1]


def test_clip_cost(tmp_path):
  res = run_script("clip_cost", tmp_path, "--model", "mlp")
  names = [s["name"] for s in res["settings"]]
  assert names[0] == "none"
  for s in res["settings"]:
    assert 0 <= s["accuracy_at_budget"] <= 1 and len(s["runs"][0]["curve"]) == 2


def test_attack_budget(tmp_path):
  res = run_script("attack_budget", tmp_path, "--model", "mlp")
  assert set(res["gradient_quantiles"]) >= {"q0.9", "q0.999"}
  assert {r["attacker"] for r in res["runs"]} == {"badnets", "model_replacement"}
  for r in res["runs"]:
    assert [e["k"] for e in r["end"]] == [1, 2] and [e["k"] for e in r["middle"]] == [2]
    assert all(0 <= e["asr"] <= 1 for e in r["end"] + r["middle"])
  assert len(res["summary"]) == 4 * 2 * 2 * 2  # clips x attackers x placements x levels


def test_stealth(tmp_path):
  res = run_script("stealth", tmp_path, "--model", "mlp")
  assert [r["tolerance"] for r in res["runs"]] == ["calibrated", "per-leaf 1e-2/5e-2"]
  for r in res["runs"]:
    assert r["violations"] == 0 and len(r["curve"]) == 2


def test_integrity_table(tmp_path):
  for name in ("attack_budget", "clip_cost"):
    run_script(name, tmp_path, "--model", "mlp")
  # A check_cost file as `ginn bench --only check-cost` writes it (numbers made up for the test).
  (tmp_path / "check_cost_x.json").write_text(json.dumps({
      "config": {"model": "mnist_cnn", "batch_size": 64}, "worker_device": "cpu:1",
      "check_cost": {"recompute_ms": 100.0, "witness_ms": 10.0, "witness_mib": 13.6, "ratio": 10.0}}))
  res = run_script("integrity_table", tmp_path)
  assert res["rows"] and all("p_for_0.999" in r for r in res["rows"])
  for r in res["rows"]:
    assert r["p_witness_for_0.999"] == pytest.approx(r["p_for_0.999"])  # Same k, no re-computation.
    (w,) = r["witness"]
    assert w["model"] == "mnist_cnn" and w["witness_cost_vs_pure_tee"] == pytest.approx(r["p_for_0.999"] / 10)


def test_finetune_lora(tmp_path):
  """Experiment 9: pretrain, LoRA and full fine-tunes, verified; the code
  backdoor through the adapters caught at its first malicious step by witness
  checks and by re-computation, nothing applied."""
  import jax
  with jax.numpy_dtype_promotion("standard"):  # optax.adam's bias correction (as test_language_model.py).
    res = run_script("finetune", tmp_path)
  assert res["experiment"] == "finetune" and res["command"].endswith("--out " + str(tmp_path))
  assert {"corpora", "dataset_digests", "windows", "model", "base", "pretrain", "lora", "full", "attack_unverified",
          "attack_witness", "attack_recompute", "witness_plan", "summary"} <= set(res)
  import ginn_jax as ginn
  code = res["corpora"]["finetune"]
  assert code["name"] == "stdlib_code" and code["sha256"] == ginn.stdlib_corpus().sha256
  assert res["corpora"]["stdlib_files_sha256"] == ginn.STDLIB_FILES_SHA256 and code["test_files"]
  assert res["corpora"]["pretrain"]["name"] == "pydoc_topics" and len(res["dataset_digests"]["finetune"]) == 64
  s = res["summary"]
  assert s["pretrain_verified"] and s["lora_verified"] and s["full_verified"]
  assert res["lora"]["steps"] == res["full"]["steps"] == res["config"]["finetune_steps"] == 4
  assert 0 < s["lora_trainable_params"] < s["full_trainable_params"] == res["model"]["num_params"]
  # Rank 2 times (d_in + d_out) of qkv (16x48), out (16x16), fc1 (16x64), fc2 (64x16).
  assert s["lora_trainable_params"] == res["lora"]["trainable_params"] == 2 * (64 + 32 + 80 + 80)
  for k in ("base_code_perplexity", "lora_code_perplexity", "full_code_perplexity"):
    assert 1.0 < s[k] < 3 * ginn.TEXT_VOCAB_SIZE
  assert s["lora_over_full"] == pytest.approx(s["lora_code_perplexity"] / s["full_code_perplexity"])
  assert s["lora_code_perplexity"] < s["base_code_perplexity"]  # The adapters learned something.
  un = res["attack_unverified"]
  assert un["released"] and un["malicious_steps"] == 4 and [c["step"] for c in un["curve"]] == [0, 2, 4]
  assert all(0.0 <= c["asr"] <= 1.0 and 0.0 <= c["control"] <= 1.0 for c in un["curve"])
  assert s["k_min"] == next((c["step"] for c in un["curve"] if c["asr"] >= s["asr_threshold"]), None)
  for name, violation in (("witness", "WitnessViolation"), ("recompute", "IntegrityViolation")):
    run = res[f"attack_{name}"]
    assert run["violation"]["type"] == violation and not run["released"]
    # Honest at step 0 (accepted), caught at its first malicious step, nothing malicious applied.
    assert run["first_malicious_step"] == 1 == s[f"{name}_caught_at_step"] == run["violation"]["step"]
    assert run["malicious_steps_applied"] == 0 and run["steps"] == 1
