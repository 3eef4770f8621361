"""`audit_run` and `ginn audit`: a clean run passes, any damage or attack fails, naming it."""
import json
import shutil
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import ginn_jax as ginn
from ginn_jax._src.audit import audit_run
from ginn_jax._src.rundir import run_verified

SECRET = b"test-audit-secret-0123456789abcdef"


def cfg(**kw):
  return ginn.ProtocolConfig(**{**dict(seed=3, batch_size=32, p=0.3), **kw})


@pytest.fixture(scope="module")
def honest_run(tmp_path_factory, mlp, small_data):
  d = tmp_path_factory.mktemp("honest") / "run"
  res = run_verified(d, mlp, *small_data, cfg(), ginn.HonestWorker(mlp, *small_data), 40,
                     audit_secret=SECRET, checkpoint_every=10, keep_reports=True)
  assert res.steps == 40 and res.violation is None
  return d


def copy(run, tmp_path):
  dst = tmp_path / "copy"
  shutil.copytree(run, dst)
  return dst


def audit(d, mlp, small_data, **kw):
  return audit_run(d, model=mlp, images=small_data[0], labels=small_data[1], **kw)


def test_clean_run_passes_every_check(honest_run, mlp, small_data):
  rep = audit(honest_run, mlp, small_data, audit_secret=SECRET)
  assert rep.ok, rep.first_failure
  kinds = [i.kind for i in rep.items]
  assert kinds.count("checkpoint") == 5 and kinds.count("report") == 40 and kinds.count("segment") == 4
  assert all("rel_l2 0.00e+00" in i.detail for i in rep.items if i.kind == "segment")  # Bitwise.


def test_auditor_samples_segments_with_its_own_seed(honest_run, mlp, small_data):
  a = audit(honest_run, mlp, small_data, sample=2, seed=7)
  b = audit(honest_run, mlp, small_data, sample=2, seed=7)
  assert a.ok and a.seed == 7
  names = [i.name for i in a.items if i.kind == "segment"]
  assert len(names) == 2 and names == [i.name for i in b.items if i.kind == "segment"]


def flip(path, pos, bit=0):
  raw = bytearray(path.read_bytes())
  raw[pos % len(raw)] ^= 1 << bit
  path.write_bytes(bytes(raw))


@pytest.mark.parametrize("target,pos", [
    ("checkpoints/step-00000020.ckpt", 5), ("checkpoints/step-00000020.ckpt", 20),
    ("checkpoints/step-00000020.ckpt", 5000), ("checkpoints/step-00000020.ckpt", -3),
    ("reports/step-00000013.rep", 30), ("reports/step-00000013.rep", 900),
    ("reports/step-00000013.rep", -1),
])
def test_flipped_bit_in_a_file_is_named(honest_run, tmp_path, mlp, small_data, target, pos):
  d = copy(honest_run, tmp_path)
  flip(d / target, pos)
  rep = audit(d, mlp, small_data)
  f = rep.first_failure
  assert not rep.ok and target in f.name and "transcript entry" in f.name
  assert f.step == int(target.split("-")[1].split(".")[0])


def test_flipped_bit_in_the_transcript_names_the_entry(honest_run, tmp_path, mlp, small_data):
  d = copy(honest_run, tmp_path)
  raw = (d / "transcript.jsonl").read_bytes()
  pos = raw.index(b'"step":17') + 8
  flip(d / "transcript.jsonl", pos, 1)
  f = audit(d, mlp, small_data).first_failure
  line = raw[:pos].count(b"\n") + 1
  assert f is not None and "transcript.jsonl" in f.detail and f"entry {line}" in f.detail


@pytest.mark.parametrize("edit", ["drop_step", "dup_step", "swap", "drop_close"])
def test_removed_duplicated_reordered_entries_fail(honest_run, tmp_path, mlp, small_data, edit):
  d = copy(honest_run, tmp_path)
  ls = (d / "transcript.jsonl").read_bytes().split(b"\n")[:-1]
  i = next(k for k, l in enumerate(ls) if b'"type":"step"' in l and b'"step":21' in l)
  if edit == "drop_step":
    del ls[i]
  elif edit == "dup_step":
    ls.insert(i, ls[i])
  elif edit == "swap":
    ls[i], ls[i + 2] = ls[i + 2], ls[i]
  else:
    ls = ls[:-1]
  (d / "transcript.jsonl").write_bytes(b"\n".join(ls) + b"\n")
  rep = audit(d, mlp, small_data)
  assert not rep.ok
  line = i + 2 if edit == "dup_step" else i + 1  # The copy, or the first record out of place.
  assert ("closing record" if edit == "drop_close" else f"entry {line}") in str(rep.first_failure)


FILES = ["transcript.jsonl", "checkpoints/step-00000010.ckpt", "checkpoints/step-00000040.ckpt",
         "reports/step-00000000.rep", "reports/step-00000039.rep"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(target=st.sampled_from(FILES), kind=st.sampled_from(["flip", "truncate", "insert", "delete"]),
       frac=st.floats(0, 1), junk=st.binary(min_size=1, max_size=8), bit=st.integers(0, 7))
def test_malformed_files_are_refused_and_left_untouched(honest_run, tmp_path_factory, mlp, small_data,
                                                       target, kind, frac, junk, bit):
  d = copy(honest_run, tmp_path_factory.mktemp("fuzz"))
  path = d / target
  raw = path.read_bytes()
  pos = min(int(frac * len(raw)), len(raw) - 1)
  bad = {"flip": raw[:pos] + bytes([raw[pos] ^ (1 << bit)]) + raw[pos + 1:],
         "truncate": raw[:pos], "insert": raw[:pos] + junk + raw[pos:],
         "delete": raw[:pos] + raw[pos + len(junk):]}[kind]
  path.write_bytes(bad)
  before = {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}
  rep = audit(d, mlp, small_data, sample=0)
  assert not rep.ok
  assert target in rep.first_failure.name + rep.first_failure.detail
  assert {p: p.read_bytes() for p in d.rglob("*") if p.is_file()} == before  # Read-only.


def test_attacked_run_fails_naming_the_violation_step(tmp_path, mlp, small_data):
  attacker = ginn.BackdoorWorker(mlp, *small_data, schedule=ginn.schedules.FromStep(12), target=0,
                                 poison_fraction=0.5)
  res = run_verified(tmp_path / "run", mlp, *small_data, cfg(p=1.0), attacker, 30, audit_secret=SECRET,
                     keep_reports=True)
  assert res.violation is not None and res.violation.step == 12 and res.steps == 12
  rep = audit(tmp_path / "run", mlp, small_data)
  assert not rep.ok and rep.first_failure.step == 12 and "violation" in rep.first_failure.detail
  with pytest.raises(ginn.RuntimeHalted):  # A halted run is not resumed.
    run_verified(tmp_path / "run", mlp, *small_data, cfg(p=1.0), attacker, 30, audit_secret=SECRET,
                 keep_reports=True)


@pytest.mark.parametrize("keep_reports", [False, True])
def test_uncaught_attack_is_exposed_by_retraining(tmp_path, mlp, small_data, keep_reports):
  """p = 0: the run's transcript is clean, but re-training the segment from the
  seed (or re-verifying the kept reports) exposes the malicious steps."""
  attacker = ginn.BackdoorWorker(mlp, *small_data, schedule=ginn.schedules.Steps([15]), target=0,
                                 poison_fraction=0.5)
  res = run_verified(tmp_path / "run", mlp, *small_data, cfg(p=0.0), attacker, 20, audit_secret=SECRET,
                     keep_reports=keep_reports)
  assert res.violation is None
  rep = audit(tmp_path / "run", mlp, small_data)
  f = rep.first_failure
  assert f is not None and f.kind == "segment" and f.name == "steps 10..20"
  assert f.step == (15 if keep_reports else 20)


def ginn_cli(*args):
  return subprocess.run([sys.executable, "-m", "ginn_jax", *args], capture_output=True, text=True,
                        timeout=600)


def test_ginn_audit_passes_on_the_demo_honest_run_and_fails_on_the_attacked_one(tmp_path):
  out = ginn_cli("demo", "--steps", "24", "--attack-start", "12", "--p", "1", "--model", "mlp",
                 "--no-progress", "--run-dir", str(tmp_path), "--checkpoint-every", "8")
  assert out.returncode == 0, out.stderr
  assert "CAUGHT at step 12" in out.stdout
  ok = ginn_cli("audit", str(tmp_path / "honest"), "--json", str(tmp_path / "a.json"))
  assert ok.returncode == 0, ok.stdout + ok.stderr
  assert json.loads((tmp_path / "a.json").read_text())["ok"] is True
  bad = ginn_cli("audit", str(tmp_path / "attacked"))
  assert bad.returncode == 1
  assert "step 12" in bad.stderr and "violation" in bad.stderr
