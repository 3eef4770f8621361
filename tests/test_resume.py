"""Crash and resume: a run killed at any moment ends with the uninterrupted run's
parameters, bitwise, and a clean audit; bad reports write nothing."""
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import ginn_jax as ginn
from ginn_jax._src.audit import audit_run
from ginn_jax._src.rundir import run_verified
from ginn_jax._src.trusted.transcript import TranscriptError, TranscriptWriter, read_transcript

from conftest import tree_bytes
from test_protocol import BAD, _mutate

SECRET = b"test-audit-secret-0123456789abcdef"
CFG = dict(seed=3, batch_size=32, p=0.3)
STEPS = 40


def run(d, mlp, small_data, worker=None, **kw):
  worker = worker or ginn.HonestWorker(mlp, *small_data)
  return run_verified(d, mlp, *small_data, ginn.ProtocolConfig(**CFG), worker, STEPS,
                      audit_secret=kw.pop("secret", SECRET), checkpoint_every=10, **kw)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, mlp, small_data):
  return run(tmp_path_factory.mktemp("ref") / "run", mlp, small_data)


def steps_in(d):
  return [r.body["step"] for r in read_transcript(d / "transcript.jsonl") if r.type == "step"]


class Crash(Exception):
  pass


class CrashAt:
  def __init__(self, worker, step):
    self.worker, self.step = worker, step

  def __call__(self, order):
    if order.step == self.step:
      raise Crash
    return self.worker(order)


@pytest.mark.parametrize("crash_at", [1, 10, 23])
def test_resume_after_a_crash_is_bitwise_and_audits_clean(tmp_path, mlp, small_data, reference, crash_at):
  w = ginn.HonestWorker(mlp, *small_data)
  with pytest.raises(Crash):
    run(tmp_path / "run", mlp, small_data, CrashAt(w, crash_at))
  res = run(tmp_path / "run", mlp, small_data, w)
  assert res.resumed_from == crash_at // 10 * 10
  assert tree_bytes(res.params) == tree_bytes(reference.params)
  assert res.final_digest == reference.final_digest
  assert [e.digest for e in res.transcript] == [e.digest for e in reference.transcript]
  assert steps_in(tmp_path / "run") == list(range(STEPS))
  rep = audit_run(tmp_path / "run", model=mlp, images=small_data[0], labels=small_data[1])
  assert rep.ok, rep.first_failure
  again = run(tmp_path / "run", mlp, small_data, w)  # A finished run is returned as it is.
  assert tree_bytes(again.params) == tree_bytes(reference.params)


def test_torn_last_line_is_dropped_on_resume(tmp_path, mlp, small_data, reference):
  w = ginn.HonestWorker(mlp, *small_data)
  with pytest.raises(Crash):
    run(tmp_path / "run", mlp, small_data, CrashAt(w, 15))
  with open(tmp_path / "run" / "transcript.jsonl", "ab") as f:
    f.write(b'{"body":{"digest":"12')
  res = run(tmp_path / "run", mlp, small_data, w)
  assert tree_bytes(res.params) == tree_bytes(reference.params)
  assert steps_in(tmp_path / "run") == list(range(STEPS))


def test_resume_with_another_secret_is_refused(tmp_path, mlp, small_data):
  w = ginn.HonestWorker(mlp, *small_data)
  with pytest.raises(Crash):
    run(tmp_path / "run", mlp, small_data, CrashAt(w, 5))
  before = (tmp_path / "run" / "transcript.jsonl").read_bytes()
  with pytest.raises(TranscriptError, match="public key"):
    run(tmp_path / "run", mlp, small_data, w, secret=b"another-secret-0123456789abcdef!")
  assert (tmp_path / "run" / "transcript.jsonl").read_bytes() == before


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, mlp, small_data, reference):
  w = ginn.HonestWorker(mlp, *small_data)
  with pytest.raises(Crash):
    run(tmp_path / "run", mlp, small_data, CrashAt(w, 25))
  ck = tmp_path / "run" / "checkpoints" / "step-00000020.ckpt"
  raw = bytearray(ck.read_bytes())
  raw[100] ^= 4
  ck.write_bytes(bytes(raw))
  res = run(tmp_path / "run", mlp, small_data, w)
  assert res.resumed_from == 10
  assert tree_bytes(res.params) == tree_bytes(reference.params)
  assert steps_in(tmp_path / "run") == list(range(STEPS))


TRAIN = """
import sys, time
import ginn_jax as ginn
from ginn_jax._src.rundir import run_verified
ds = ginn.load_dataset("mnist5k")
x, y = ds.train_images[:512], ds.train_labels[:512]
mlp = ginn.get_model("mlp", input_shape=(28, 28, 1))
w = ginn.HonestWorker(mlp, x, y)
def slow(order):
  time.sleep(0.03)
  return w(order)
run_verified(sys.argv[1], mlp, x, y, ginn.ProtocolConfig(**{cfg}), slow, {steps},
             audit_secret={secret!r}, checkpoint_every=10)
"""


def test_sigkill_at_random_steps_resumes_bitwise(tmp_path, mlp, small_data, reference):
  script = tmp_path / "train.py"
  script.write_text(TRAIN.format(cfg=CFG, steps=STEPS, secret=SECRET))
  rng = random.Random(1234)
  for trial in range(3):
    d = tmp_path / f"run{trial}"
    kill_after = rng.randrange(1, STEPS - 2)
    proc = subprocess.Popen([sys.executable, str(script), str(d)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
      path = d / "transcript.jsonl"
      if path.exists() and path.read_bytes().count(b'"type":"step"') >= kill_after:
        time.sleep(rng.random() * 0.03)
        break
      time.sleep(0.005)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    res = run(d, mlp, small_data)
    assert res.resumed_from is not None and res.resumed_from <= kill_after
    assert tree_bytes(res.params) == tree_bytes(reference.params), trial
    assert steps_in(d) == list(range(STEPS))
    rep = audit_run(d, model=mlp, images=small_data[0], labels=small_data[1])
    assert rep.ok, rep.first_failure


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(BAD), warmup=st.integers(0, 3))
def test_malformed_reports_write_nothing_and_change_nothing(tmp_path_factory, mlp, small_data, kind,
                                                            warmup):
  path = tmp_path_factory.mktemp("bad") / "transcript.jsonl"
  rt = ginn.TrustedRuntime(mlp, *small_data, ginn.ProtocolConfig(**CFG), audit_secret=SECRET)
  writer = TranscriptWriter.create(path, {"public_key": ginn_public_key(rt)}, rt.signing_seed())
  rt.recorder = writer
  w = ginn.HonestWorker(mlp, *small_data)
  ginn.train(rt, w, warmup, progress=False)
  before = (path.read_bytes(), rt.step, tree_bytes(rt.state.params), tree_bytes(rt.state.opt_state),
            len(rt.transcript))
  bad, expected = _mutate(w(rt.next_order()), rt.state.params, kind)
  with pytest.raises(expected, match=str(warmup)):
    rt.submit(bad)
  assert (path.read_bytes(), rt.step, tree_bytes(rt.state.params), tree_bytes(rt.state.opt_state),
          len(rt.transcript)) == before
  rt.submit(w(rt.next_order()))  # And the chain goes on intact.
  writer.close()
  assert [r.body["step"] for r in read_transcript(path)[1:]] == list(range(warmup + 1))


def ginn_public_key(rt):
  from ginn_jax._src.trusted.transcript import public_key_hex
  return public_key_hex(rt.signing_seed())
