"""`ginn bench` smoke test, no recompilation, flat memory."""
import json
import subprocess
import sys

import jax
import pytest

import ginn_jax as ginn
from ginn_jax._src import bench as bench_mod
from ginn_jax._src.trusted import runtime as runtime_mod


CHECK_COST_KEYS = ("recompute_ms", "witness_ms", "ratio", "witness_mib", "fused_step_ms",
                   "witness_step_ms", "witness_step_ratio")
METADATA_KEYS = ("config", "worker_device", "trusted_device", "jax_version", "machine",
                 "param_bytes", "peak_rss_mib", "digest_gb_per_s", "load_average_1m")


def _check_cost_ok(c):
  for k in CHECK_COST_KEYS:
    assert isinstance(c[k], float) and c[k] > 0, (k, c[k])
  assert c["ratio"] == pytest.approx(c["recompute_ms"] / c["witness_ms"], rel=1e-12)
  assert c["witness_step_ratio"] == pytest.approx(c["witness_step_ms"] / c["fused_step_ms"], rel=1e-12)
  parts = c["witness_parts_ms"]
  assert set(parts) == {"validate", "receive", "freivalds"}
  assert all(v > 0 for v in parts.values())
  # The timed checks ran on an honest step: both passed.
  assert c["recompute_max_rel_l2"] <= 1e-5 and c["witness_max_rel_l2"] <= 2e-5


def _bench(tmp_path, *args):
  path = tmp_path / "bench.json"
  out = subprocess.run([sys.executable, "-m", "ginn_jax", "bench", "--model", "mlp", "--no-progress",
                        "--json", str(path), *args], capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr
  return out.stdout, json.loads(path.read_text())


def test_bench_smoke(tmp_path):
  # p = 0 and 1 re-compute no step and every step, whatever the digests (which
  # steps p = 0.5 drew would depend on the machine's float bits: tests/README.md).
  stdout, res = _bench(tmp_path, "--steps", "3", "--repeats", "2", "--warmup", "1", "--ps", "0,1",
                       "--p-witnesses", "0.5,1", "--check-repeats", "1")
  assert "unprotected" in stdout and "pure_tee" in stdout and "check cost per step" in stdout
  names = [r["config"] for r in res["rows"]]
  assert names == ["unprotected", "pure_tee", "ginn_sync_p0", "ginn_sync_p1",
                   "ginn_sync_p0_pw0.5", "ginn_sync_p0_pw1", "ginn_deferred_p0", "ginn_deferred_p1",
                   "ginn_deferred_p0_pw0.5", "ginn_deferred_p0_pw1"]
  for r in res["rows"]:
    assert r["steps_per_s"] > 0 and r["rss_mib"] > 0
  unprot = res["rows"][0]
  assert unprot["vs_unprotected"] == 1.0
  g = res["rows"][3]
  assert g["bound_1_over_p"] == 1.0 and 0 <= g["bookkeeping_fraction"] < 1
  assert g["steps_verified"] == 1 + 3 * 2 and g["p_witness"] == 0.0  # Warm-up and timed steps.
  assert res["rows"][2]["steps_verified"] == 0
  ginn_rows = {r["config"]: r for r in res["rows"] if r["config"].startswith("ginn")}
  for name, r in ginn_rows.items():
    assert r["p_witness"] == (float(name.split("_pw")[1]) if "_pw" in name else 0.0)
    assert "_pw" not in name or r["p"] == 0.0
  for mode in ("sync", "deferred"):  # p_witness = 1 checks every timed step's witness.
    w = ginn_rows[f"ginn_{mode}_p0_pw1"]
    assert w["steps_verified"] >= 3 * 2 and w["phase_ms_per_step"]["witness"] > 0
    assert w["bound_1_over_p"] is None and w["ideal_speedup_vs_pure_tee"] > 0
  assert res["config"]["p_witnesses"] == [0.5, 1.0] and res["config"]["only"] is None
  _check_cost_ok(res["check_cost"])
  assert res["check_cost"]["repeats"] == 1
  assert "cpu" in res["worker_device"] and "cpu" in res["trusted_device"]


def test_bench_only_check_cost(tmp_path):
  stdout, res = _bench(tmp_path, "--only", "check-cost", "--batch-size", "16", "--check-repeats", "2")
  assert res["rows"] == [] and "unprotected" not in stdout
  assert "check cost per step" in stdout
  for k in METADATA_KEYS:
    assert k in res
  assert res["config"]["only"] == "check-cost" and res["param_bytes"] > 0
  c = res["check_cost"]
  _check_cost_ok(c)
  assert c["repeats"] == 2
  # mlp at batch 16: 5 products; only the first layer's forward [16, 32] (784 terms per output)
  # is witnessed; the others sum over at most 64 terms and are re-computed. float32.
  assert c["witness_mib"] == pytest.approx(16 * 32 * 4 / 2**20)
  assert c["plan"]["products"] == 5 and c["plan"]["witness_mib"] == pytest.approx(c["witness_mib"])
  assert len(c["plan"]["digest"]) == 64


def test_check_cost_in_process_cnn(mnist5k):
  """The check-cost path under the hardened test runtime (explicit transfers only,
  key-reuse checks), on the CNN: the witness is what `WitnessSpec` says."""
  from ginn_jax._src import bench
  cfg = bench.BenchConfig(model="mnist_cnn", batch_size=4, check_repeats=1, only="check-cost")
  model = ginn.get_model("mnist_cnn", input_shape=(28, 28, 1))
  images, labels = mnist5k.train_images[:64], mnist5k.train_labels[:64]
  c = bench.measure_check_cost(model, images, labels, cfg, ginn.worker_device())
  _check_cost_ok(c)
  plan = ginn.witness_plan(model, ginn.Batch(images[:4], labels[:4]))
  assert c["witness_mib"] == plan.witness_bytes / 2**20 and c["plan"]["digest"] == plan.digest
  assert c["plan"]["products"] == 14  # 3 convs and 2 dense forward; 5 weight, 4 input gradients.


def test_bench_only_ceiling(tmp_path):
  stdout, res = _bench(tmp_path, "--only", "ceiling", "--batch-size", "16", "--ceiling-steps", "2",
                       "--ceiling-repeats", "1")
  assert res["rows"] == [] and res["check_cost"] is None and "ceiling (blake3 digest)" in stdout
  c = res["ceiling"]
  for k in ("trusted_ms", "floor_ms", "pure_tee_ms", "ceiling_speedup", "vs_floor",
            "trusted_ms_at_p_witness"):
    assert c[k] > 0, k
  assert res["config"]["only"] == "ceiling" and c["steps"] == 2 and c["repeats"] == 1


def test_bench_ceiling_with_lora_rank_reports_the_adapters_only(tmp_path):
  """`--lora-rank`: the trusted side's report is the adapters' bytes (rank 2
  on the MLP's two kernels), the base is frozen and counted apart."""
  stdout, res = _bench(tmp_path, "--only", "ceiling", "--batch-size", "16", "--ceiling-steps", "2",
                       "--ceiling-repeats", "1", "--lora-rank", "2")
  c = res["ceiling"]
  adapters = 4 * 2 * ((784 + 32) + (32 + 10))  # float32, rank 2, a (d_in x 2) and b (2 x d_out) per kernel.
  assert res["lora_rank"] == 2 and c["report_bytes"] == adapters == res["param_bytes"]
  assert res["frozen_bytes"] == 4 * (784 * 32 + 32 + 32 * 10 + 10)
  assert c["trusted_ms"] > 0 and c["trusted_ms_witness"] > 0
  with pytest.raises(ValueError, match="lora_rank"):
    bench_mod.BenchConfig(lora_rank=0)


def test_bench_config_rejects_unknown_only():
  from ginn_jax._src.bench import BenchConfig
  with pytest.raises(ValueError, match="only"):
    BenchConfig(only="rows")


@pytest.mark.parametrize("deferred", [False, True])
def test_no_recompilation_after_the_first_step(mlp, small_data, deferred):
  cfg = ginn.ProtocolConfig(seed=1, batch_size=32, p=0.5, clip="elementwise", clip_value=0.01)
  rt = ginn.TrustedRuntime(mlp, *small_data, cfg, audit_secret=b"x" * 32, deferred=deferred)
  w = ginn.HonestWorker(mlp, *small_data)
  ginn.train(rt, w, 1, progress=False)
  # Whether step 0's coin drew a re-computation depends on its digest (the
  # machine's float bits): compile that path now either way.
  rt.compile_verification()
  jitted = [runtime_mod._checked_update, w.grad_fn._fn, rt._reference._fn]
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
  assert rt.num_verified > 700  # Of 2000 coins at p = 0.5: fails with probability < 2^-130.


def test_compile_verification_changes_nothing_and_compiles(mlp, small_data):
  from conftest import tree_bytes
  cfg = ginn.ProtocolConfig(seed=4, batch_size=32, p=1.0, clip="elementwise", clip_value=0.01)
  rt = ginn.TrustedRuntime(mlp, *small_data, cfg, audit_secret=b"c" * 32)
  worker = ginn.HonestWorker(mlp, *small_data)
  # The worker shares the jitted gradient function (its device is another cache entry):
  # compiled first, so that only the trusted side's entries are counted below.
  jax.block_until_ready(worker(rt.next_order()).grads)
  before = (rt.step, tree_bytes(rt.state.params), len(rt.transcript), rt.num_verified)
  rt.compile_verification()
  assert (rt.step, tree_bytes(rt.state.params), len(rt.transcript), rt.num_verified) == before
  size = rt._reference._fn._cache_size()
  assert size >= 1
  ginn.train(rt, worker, 3, progress=False)
  assert rt._reference._fn._cache_size() == size and rt.num_verified == 3
