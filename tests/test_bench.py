"""`ginn bench` smoke test, no recompilation, flat memory."""
import json
import subprocess
import sys

import pytest

import ginn_jax as ginn
from ginn_jax._src.trusted import runtime as runtime_mod


def test_bench_smoke(tmp_path):
  path = tmp_path / "bench.json"
  out = subprocess.run(
      [sys.executable, "-m", "ginn_jax", "bench", "--model", "mlp", "--steps", "3", "--repeats", "2",
       "--warmup", "1", "--ps", "0,0.5", "--no-progress", "--json", str(path)],
      capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr
  assert "unprotected" in out.stdout and "pure_tee" in out.stdout
  res = json.loads(path.read_text())
  names = [r["config"] for r in res["rows"]]
  assert names == ["unprotected", "pure_tee", "ginn_sync_p0", "ginn_sync_p0.5",
                   "ginn_deferred_p0", "ginn_deferred_p0.5"]
  for r in res["rows"]:
    assert r["steps_per_s"] > 0 and r["rss_mib"] > 0
  unprot = res["rows"][0]
  assert unprot["vs_unprotected"] == 1.0
  g = res["rows"][3]
  assert g["bound_1_over_p"] == 2.0 and 0 <= g["bookkeeping_fraction"] < 1
  assert g["steps_verified"] > 0
  assert "cpu" in res["worker_device"] and "cpu" in res["trusted_device"]


@pytest.mark.parametrize("deferred", [False, True])
def test_no_recompilation_after_the_first_step(mlp, small_data, deferred):
  cfg = ginn.ProtocolConfig(seed=1, batch_size=32, p=0.5, clip="elementwise", clip_value=0.01)
  rt = ginn.TrustedRuntime(mlp, *small_data, cfg, audit_secret=b"x" * 32, deferred=deferred)
  w = ginn.HonestWorker(mlp, *small_data)
  ginn.train(rt, w, 1, progress=False)
  jitted = [runtime_mod._jit_update, w.grad_fn._fn, rt._reference._fn]
  sizes = [f._cache_size() for f in jitted]
  ginn.train(rt, w, 40, progress=False)  # Crosses two epochs; p = 0.5 re-computes on the trusted side.
  rt.close()
  assert [f._cache_size() for f in jitted] == sizes


def _rss_mib():
  import resource
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * resource.getpagesize() / 2**20


@pytest.mark.parametrize("deferred", [False, True])
def test_memory_is_flat_over_2000_steps(mlp, small_data, deferred):
  cfg = ginn.ProtocolConfig(seed=2, batch_size=32, p=0.5, clip="elementwise", clip_value=0.01)
  rt = ginn.TrustedRuntime(mlp, *small_data, cfg, audit_secret=b"m" * 32, deferred=deferred)
  w = ginn.HonestWorker(mlp, *small_data)
  ginn.train(rt, w, 300, progress=False)
  before = _rss_mib()
  ginn.train(rt, w, 1700, progress=False)
  growth = _rss_mib() - before
  rt.close()
  # Keeping every sampled step's check alive would cost ~850 x 200 KB = 170 MiB here.
  assert growth < 25, f"RSS grew by {growth:.1f} MiB over 1700 steps"
  assert rt.num_verified > 700


def test_compile_verification_changes_nothing_and_compiles(mlp, small_data):
  from conftest import tree_bytes
  cfg = ginn.ProtocolConfig(seed=4, batch_size=32, p=1.0, clip="elementwise", clip_value=0.01)
  rt = ginn.TrustedRuntime(mlp, *small_data, cfg, audit_secret=b"c" * 32)
  before = (rt.step, tree_bytes(rt.state.params), len(rt.transcript), rt.num_verified)
  rt.compile_verification()
  assert (rt.step, tree_bytes(rt.state.params), len(rt.transcript), rt.num_verified) == before
  size = rt._reference._fn._cache_size()
  assert size >= 1
  ginn.train(rt, ginn.HonestWorker(mlp, *small_data), 3, progress=False)
  assert rt._reference._fn._cache_size() == size and rt.num_verified == 3
