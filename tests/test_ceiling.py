"""The trusted side's fast path (issue 12): received copies, one-pass digest,
named digest, and the ceiling bench. Nothing weaker than before."""
import hashlib

import jax
import numpy as np
import pytest

import ginn_jax as ginn
from ginn_jax._src import bench
from ginn_jax._src.audit import audit_run
from ginn_jax._src.boundary import GradientReport, Witness
from ginn_jax._src.rundir import run_verified
from ginn_jax._src.trusted import commit
from ginn_jax._src.trusted import runtime as runtime_mod
from ginn_jax._src.trusted.transcript import read_transcript

from conftest import tree_bytes

SECRET = b"test-audit-secret-0123456789abcdef"


def config(**kw):
  return ginn.ProtocolConfig(**{**dict(seed=3, batch_size=32, p=1.0, clip="elementwise",
                                       clip_value=0.01), **kw})


def host(tree):
  return jax.tree_util.tree_map(lambda x: np.array(jax.device_get(x), copy=True), tree)


class MutatingWorker:
  """An honest worker that sends numpy buffers and overwrites them right after
  the runtime returned (report and witness): poison in every later read."""

  def __init__(self, worker):
    self.worker = worker
    self.sent: list[np.ndarray] = []

  def __call__(self, order):
    self.spoil()
    r = self.worker(order)
    r = GradientReport(step=r.step, grads=host(r.grads), loss=np.float32(jax.device_get(r.loss)))
    self.sent += jax.tree_util.tree_leaves(r.grads)
    return r

  def witness(self, request):
    w = self.worker.witness(request)
    w = Witness(step=w.step, outputs=host(list(w.outputs)), input_grads=host(list(w.input_grads)))
    self.sent += [*w.outputs, *w.input_grads]
    return w

  def spoil(self):
    for a in self.sent:
      a[...] = 1e3  # Large, finite: it would be applied and would fail every check.
    self.sent.clear()


@pytest.mark.parametrize("deferred", [False, True])
def test_buffers_changed_after_submit_change_nothing(mlp, small_data, deferred):
  x, y = small_data
  cfg = config(p=1.0, p_witness=1.0)
  ref = ginn.TrustedRuntime(mlp, x, y, cfg, audit_secret=SECRET, deferred=deferred)
  rt = ginn.TrustedRuntime(mlp, x, y, cfg, audit_secret=SECRET, deferred=deferred)
  honest = ginn.HonestWorker(mlp, x, y)
  ginn.train(ref, honest, 6, progress=False)
  w = MutatingWorker(ginn.HonestWorker(mlp, x, y))
  for _ in range(6):
    rt.submit(w(rt.next_order()), witness=w.witness)
    w.spoil()  # After submit returned; deferred checks of the step are still queued.
  rt.finalize()
  assert rt.num_verified == ref.num_verified == 6 and rt.halted is None
  assert tree_bytes(rt.state.params) == tree_bytes(ref.state.params)
  # What was hashed (digests, MACs, coins) too; deferred checks land in either order.
  order = lambda e: (e.step, e.kind)  # noqa: E731
  assert sorted(rt.transcript, key=order) == sorted(ref.transcript, key=order)


def test_runtime_keeps_no_reference_to_worker_arrays(mlp, small_data):
  """Even a report already on the trusted device is copied: the runtime's
  leaves never share memory with the worker's."""
  x, y = small_data
  rt = ginn.TrustedRuntime(mlp, x, y, config(p=0.0), audit_secret=SECRET)
  r = ginn.HonestWorker(mlp, x, y, device=rt.device)(rt.next_order())
  received = commit.receive_report(r, step=0, params=rt.state.params, device=rt.device)
  for mine, theirs in zip(received.leaves, jax.tree_util.tree_leaves(r.grads)):
    assert mine is not theirs
    assert mine.unsafe_buffer_pointer() != theirs.unsafe_buffer_pointer()
  numpy_leaves = [np.ones(1 << 16, np.float32), np.ones(3, np.float32)]
  copies = commit.copy_to(numpy_leaves, rt.device)
  jax.block_until_ready(copies)
  for a in numpy_leaves:
    a[...] = 7
  assert all((np.asarray(c) == 1).all() for c in copies)


def _tiny_report():
  leaves = [np.arange(6, dtype=np.float32).reshape(2, 3) / 7, np.array([0.5, -2.0], np.float32)]
  params = {"a": np.zeros((2, 3), np.float32), "b": np.zeros(2, np.float32)}
  return GradientReport(step=5, grads={"a": leaves[0], "b": leaves[1]}, loss=np.float32(0.25)), params


def test_sha256_digest_is_the_documented_encoding():
  """Old runs (SHA-256) keep their digests: the encoding, computed by hand."""
  r, _ = _tiny_report()
  h = hashlib.sha256(b"ginn_jax/report/v1" + (5).to_bytes(8, "big") + np.float32(0.25).tobytes())
  for leaf in (r.grads["a"], r.grads["b"]):
    h.update(f"<f4{leaf.shape}".encode() + leaf.tobytes())
  leaves = [r.grads["a"], r.grads["b"]]
  assert commit.report_digest(5, leaves, np.float32(0.25), name="sha256") == h.digest()
  assert commit.report_digest(5, leaves, np.float32(0.25)) == h.digest()  # The default: old runs.


@pytest.mark.parametrize("name", commit.DIGEST_NAMES)
def test_received_digest_equals_the_host_digest(name):
  r, params = _tiny_report()
  dev = ginn.trusted_device()
  got = commit.digest_received(commit.receive_report(r, step=5, params=params, device=dev), name=name)
  assert got == commit.report_digest(5, [r.grads["a"], r.grads["b"]], np.float32(0.25), name=name)
  other = commit.report_digest(5, [r.grads["a"], r.grads["b"]], np.float32(0.25),
                               name=[n for n in commit.DIGEST_NAMES if n != name][0])
  assert got != other
  with pytest.raises(ValueError, match="unknown report digest"):
    commit.report_digest(5, [], np.float32(0), name="md5")


@pytest.mark.parametrize("where", [0, 17, 999])
def test_update_flags_find_a_nan_anywhere_and_count_it(mlp, small_data, where):
  x, y = small_data
  rt = ginn.TrustedRuntime(mlp, x, y, config(p=0.0), audit_secret=SECRET)
  before = (rt.step, tree_bytes(rt.state.params), tree_bytes(rt.state.opt_state), len(rt.transcript))
  r = ginn.HonestWorker(mlp, x, y)(rt.next_order())
  grads = host(r.grads)
  leaf = grads["Dense_0"]["kernel"].reshape(-1)
  leaf[where], leaf[-where - 1] = np.nan, -np.inf
  with pytest.raises(ginn.NonFiniteReport, match=r"\['Dense_0'\]\['kernel'\] holds 2 NaN/Inf"):
    rt.submit(GradientReport(step=0, grads=grads, loss=r.loss))
  assert (rt.step, tree_bytes(rt.state.params), tree_bytes(rt.state.opt_state), len(rt.transcript)) == before
  # Finite values whose float32 sum overflows are finite: accepted.
  big = jax.tree_util.tree_map(lambda g: np.full_like(g, 3e38), host(r.grads))
  rt.submit(GradientReport(step=0, grads=big, loss=r.loss))
  assert rt.step == 1
  leaves, _ = commit.validate_report(GradientReport(step=0, grads=big, loss=r.loss), step=0, params=big)
  assert all((leaf == np.float32(3e38)).all() for leaf in leaves)  # The host check agrees.


def test_digest_is_named_in_the_header_and_sha256_runs_audit_and_resume(tmp_path, mlp, small_data,
                                                                         monkeypatch):
  """A run made before the digest was named (no header field, SHA-256) still
  audits, and resumes with SHA-256; a new run uses and names BLAKE3."""
  x, y = small_data
  w = ginn.HonestWorker(mlp, x, y)
  new = run_verified(tmp_path / "new", mlp, x, y, config(p=0.3), w, 12, audit_secret=SECRET,
                     checkpoint_every=4, keep_reports=True)
  header = read_transcript(tmp_path / "new" / "transcript.jsonl")[0].body
  assert header["report_digest"] == "blake3"
  assert audit_run(tmp_path / "new", model=mlp, images=x, labels=y).ok

  # An old run: SHA-256 digests and a header without the field.
  real_header = runtime_mod.TrustedRuntime.public_header

  def old_header(self):
    h = real_header(self)
    assert h.pop("report_digest") == "sha256"
    return h

  class Crash(Exception):
    pass

  def crash_at_9(order):
    if order.step == 9:
      raise Crash
    return w(order)

  monkeypatch.setattr(runtime_mod.TrustedRuntime, "public_header", old_header)
  monkeypatch.setattr(commit, "DEFAULT_DIGEST", "sha256")
  with pytest.raises(Crash):
    run_verified(tmp_path / "old", mlp, x, y, config(p=0.3), crash_at_9, 12, audit_secret=SECRET,
                 checkpoint_every=4, keep_reports=True)
  monkeypatch.undo()
  records = read_transcript(tmp_path / "old" / "transcript.jsonl")
  assert "report_digest" not in records[0].body
  old = [r.body["digest"] for r in records if r.type == "step"]
  assert len(old) == 9 and old != [e.digest for e in new.transcript[:9]]
  # Resumed by this version: it goes on with SHA-256, ends where the new run ends, audits clean.
  resumed = run_verified(tmp_path / "old", mlp, x, y, config(p=0.3), w, 12, audit_secret=SECRET,
                         checkpoint_every=4, keep_reports=True)
  assert resumed.resumed_from == 8
  assert tree_bytes(resumed.params) == tree_bytes(new.params)
  # The audit re-hashes every kept report (steps 8-11 too) with the header's SHA-256.
  assert audit_run(tmp_path / "old", model=mlp, images=x, labels=y).ok


def test_unknown_digest_name_is_refused(mlp, small_data):
  with pytest.raises(ValueError, match="report_digest"):
    ginn.TrustedRuntime(mlp, *small_data, config(), audit_secret=SECRET, report_digest="md5")


def test_ceiling_measures_a_replayed_honest_run(mlp, small_data):
  x, y = small_data
  cfg = bench.BenchConfig(model="mlp", batch_size=32, ceiling_steps=3, ceiling_repeats=2)
  c = bench.measure_ceiling(mlp, x, y, cfg, ginn.worker_device())
  for k in ("trusted_ms", "floor_ms", "pure_tee_ms", "ceiling_speedup", "vs_floor",
            "trusted_ms_witness", "trusted_ms_at_p_witness"):
    assert isinstance(c[k], float) and c[k] > 0, (k, c[k])
  assert c["ceiling_speedup"] == pytest.approx(c["pure_tee_ms"] / c["trusted_ms"])
  assert c["vs_floor"] == pytest.approx(c["trusted_ms"] / c["floor_ms"])
  assert c["p_witness"] == pytest.approx(1 - 0.001 ** (1 / 16))
  assert c["trusted_ms_at_p_witness"] == pytest.approx(
      (1 - c["p_witness"]) * c["trusted_ms"] + c["p_witness"] * c["trusted_ms_witness"])
  # Read the report; read and write the parameters and the momentum (SGD's only state).
  assert c["report_bytes"] == c["param_bytes"] == c["opt_state_bytes"] > 0
  assert c["bytes_touched"] == 5 * c["param_bytes"]
  assert set(c["phase_ms"]) >= {"receive", "update", "digest", "mac_coin"}
  assert c["bandwidth_gb_per_s"]["all_cores"] > 0
