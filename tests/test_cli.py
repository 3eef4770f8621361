"""The `ginn` command, run as a user would (subprocesses)."""
import json
import subprocess
import sys

import pytest


def ginn(*args, timeout=600):
  return subprocess.run([sys.executable, "-m", "ginn_jax", *args], capture_output=True, text=True,
                        timeout=timeout)


def test_help_lists_subcommands():
  out = ginn("--help")
  assert out.returncode == 0
  for cmd in ("demo", "train", "calibrate", "analyze", "data"):
    assert cmd in out.stdout


def test_analyze_reproduces_the_design_number():
  out = ginn("analyze", "--k", "688", "--p", "0.01", "--clip-value", "0.005", "--lr", "0.1")
  assert out.returncode == 0, out.stderr
  res = json.loads(out.stdout)
  assert res["p_for_0.999"] == pytest.approx(0.01, abs=2e-4)
  assert res["detection_probability"] == pytest.approx(0.999, abs=2e-4)
  assert res["deviation_bound"]["per_step"] == pytest.approx(2 * 0.1 * 0.005)  # The paper's setting.


def test_analyze_unbounded_cases_are_valid_json():
  out = ginn("analyze", "--clip", "none", "--p", "0")
  assert out.returncode == 0, out.stderr
  res = json.loads(out.stdout, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
  assert res["deviation_bound"]["bounded"] is False and res["deviation_bound"]["per_step"] is None
  assert res["ideal_speedup"] is None and res["k_for_0.999"] is None


def test_analyze_with_witness_checks():
  out = ginn("analyze", "--k", "688", "--p", "0.005", "--p-witness", "0.005", "--witness-ratio", "20")
  assert out.returncode == 0, out.stderr
  res = json.loads(out.stdout)
  # The existing keys are still there, unchanged.
  assert res["detection_probability"] == pytest.approx(1 - 0.995**688)
  assert res["p_for_0.999"] == pytest.approx(0.01, abs=2e-4)
  assert res["p_witness"] == 0.005
  assert res["combined_detection_probability"] == pytest.approx(1 - (0.995 * 0.995)**688)
  # With p = 0.005 already, a little more than 0.005 of witness checks reaches 0.999.
  pw = res["required_p_witness"]
  assert 0.005 < pw < 0.0051
  assert 1 - (0.995 * (1 - pw))**688 == pytest.approx(0.999)
  assert res["trusted_cost"] == pytest.approx(0.005 + 0.005 / 20)


def test_analyze_required_p_witness_without_p():
  out = ginn("analyze", "--k", "688", "--p-witness", "0.01")
  assert out.returncode == 0, out.stderr
  res = json.loads(out.stdout)
  assert res["required_p_witness"] == pytest.approx(res["p_for_0.999"])
  assert res["combined_detection_probability"] == pytest.approx(0.999, abs=2e-4)
  assert "detection_probability" not in res  # Needs --p.


def test_analyze_refuses_a_bad_witness_probability():
  out = ginn("analyze", "--p-witness", "1.5")
  assert out.returncode == 2 and "p-witness" in out.stderr


def test_missing_tfds_dataset_is_a_clear_error(tmp_path):
  out = ginn("data", "digest", "cifar10", "--data-dir", str(tmp_path))
  assert out.returncode == 2
  assert "cifar10" in out.stderr and str(tmp_path) in out.stderr and "ginn data prepare" in out.stderr


def _check_demo(summary, *, p1: bool):
  assert summary["honest_violations"] == 0
  assert summary["honest_steps"] == summary["config"]["steps"]
  assert summary["attack_first_malicious_step"] == summary["config"]["attack_start"]
  assert summary["attack_detected"] is True
  caught = summary["attack_detected_at_step"]
  assert caught >= summary["attack_first_malicious_step"]
  if p1:
    assert caught == summary["attack_first_malicious_step"]
  assert summary["steps_verified"] > 0


def test_tiny_demo_with_every_step_verified(tmp_path):
  path = tmp_path / "demo.json"
  out = ginn("demo", "--steps", "30", "--attack-start", "12", "--p", "1", "--model", "mlp",
             "--no-progress", "--json", str(path), "--run-dir", "")
  assert out.returncode == 0, out.stderr
  assert "CAUGHT at step 12" in out.stdout
  _check_demo(json.loads(path.read_text()), p1=True)


@pytest.mark.slow
def test_default_demo_catches_the_attack(tmp_path):
  """The README's main job, on its default settings."""
  path = tmp_path / "demo.json"
  runs = tmp_path / "runs"
  out = ginn("demo", "--no-progress", "--json", str(path), "--run-dir", str(runs))
  assert out.returncode == 0, out.stderr
  s = json.loads(path.read_text())
  _check_demo(s, p1=False)
  assert s["honest_clean_accuracy"] > 0.93
  # The run it leaves behind passes the audit (3 of its 12 segments re-trained: the
  # whole audit is another 1.5 min; test_audit re-trains every segment of a smaller
  # demo); the attacked one fails naming the step.
  honest = ginn("audit", str(runs / "honest"), "--sample", "3", "--seed", "0")
  assert honest.returncode == 0, honest.stdout + honest.stderr
  attacked = ginn("audit", str(runs / "attacked"))
  assert attacked.returncode == 1
  assert f"step {s['attack_detected_at_step']}" in attacked.stderr
