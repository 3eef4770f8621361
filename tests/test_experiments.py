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
