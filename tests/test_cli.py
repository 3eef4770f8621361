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


def _transcript_steps(path) -> list:
  records = []
  with open(path) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except ValueError:  # A line torn by the kill.
        break
  return records


@pytest.mark.slow
def test_train_run_dir_is_killed_and_resumed_bitwise(tmp_path):
  """`ginn train --run-dir`: SIGKILL mid-run, the same command again: the run
  continues and ends bitwise where an uninterrupted run ends; it audits clean;
  the secret stays beside the run directory, not in it."""
  import os
  import signal
  import time

  secret = tmp_path / "shared.secret"
  secret.write_text("0a" * 32)
  args = ["train", "--dataset", "digits", "--model", "mlp", "--steps", "24", "--batch-size", "32",
          "--p", "0.5", "--tolerance", '{"rel_l2": 1e-5, "max_abs": 1e-5}', "--no-progress",
          "--checkpoint-every", "3", "--audit-secret-file", str(secret)]
  whole = ginn(*args, "--run-dir", str(tmp_path / "whole"))
  assert whole.returncode == 0, whole.stderr
  whole = json.loads(whole.stdout)
  assert whole["resumed_from"] is None and whole["steps"] == 24 and whole["verified"]

  killed = tmp_path / "killed"
  proc = subprocess.Popen([sys.executable, "-m", "ginn_jax", *args, "--run-dir", str(killed)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
  try:
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
      path = killed / "transcript.jsonl"
      if path.exists() and any(r["type"] == "step" and r["body"]["step"] >= 4
                               for r in _transcript_steps(path)):
        break
      time.sleep(0.01)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
  assert proc.returncode == -signal.SIGKILL  # Killed, not ended.
  assert not [r for r in _transcript_steps(killed / "transcript.jsonl") if r["type"] == "close"]

  again = ginn(*args, "--run-dir", str(killed))
  assert again.returncode == 0, again.stderr
  again = json.loads(again.stdout)
  assert again["resumed_from"] is not None and again["steps"] == 24
  assert again["final_digest"] == whole["final_digest"]
  assert again["public_key"] == whole["public_key"]
  bodies = {name: [(r["type"], r["body"]) for r in _transcript_steps(tmp_path / name / "transcript.jsonl")
                   if r["type"] in ("step", "check")] for name in ("whole", "killed")}
  assert bodies["killed"] == bodies["whole"]
  audit = ginn("audit", str(killed), "--public-key", whole["public_key"])
  assert audit.returncode == 0, audit.stdout + audit.stderr

  # Other settings for the same directory are refused, and so is a missing secret.
  other = ginn(*[a if a != "32" else "16" for a in args], "--run-dir", str(killed))
  assert other.returncode == 2 and "config" in other.stderr, other.stderr
  no_secret = ginn(*args[:-2], "--run-dir", str(killed))
  assert no_secret.returncode == 2 and "killed.secret" in no_secret.stderr, no_secret.stderr
  # A new run with no --audit-secret-file: its secret is created beside it, private.
  fresh = ginn(*args[:-2], "--steps", "2", "--run-dir", str(tmp_path / "fresh"))
  assert fresh.returncode == 0, fresh.stderr
  assert (tmp_path / "fresh.secret").stat().st_mode & 0o077 == 0
  assert not [p for p in (tmp_path / "fresh").rglob("*") if "secret" in p.name]
