"""`ginn bench`: GINN against unprotected and pure-TEE training, in one process.

Every configuration is measured in the same process, interleaved (one block
of each configuration per repetition, so drifts of a noisy machine hit all of
them alike), after warm-up, and reported as the median over repetitions:

* ``unprotected``: the usual fused jitted train step (gradient, clip, update)
  on the worker device; no integrity at all.
* ``pure_tee``: the same fused step on the trusted CPU device.
* ``ginn``: the protocol (work order -> worker -> validate, digest, MAC, coin,
  clip+update, verify) at each p, synchronous and deferred.

Speed model (docs/design.md section 8): with T_u the unprotected step and T_tee the
pure-TEE step, the ideal GINN step is T_u + p*T_tee (synchronous) or
max(T_u, p*T_tee) (deferred); the speedup over pure TEE is bounded by 1/p.
"""
from __future__ import annotations

import dataclasses
import json
import platform
import resource
import statistics
import time
from typing import Any, Callable

import jax
import numpy as np
import optax
from tqdm.auto import tqdm

from ginn_jax._src.data import load_dataset
from ginn_jax._src.devices import trusted_device, worker_device
from ginn_jax._src.models import get_model
from ginn_jax._src.step import compute_grads
from ginn_jax._src.trusted import keys, verify
from ginn_jax._src.trusted.runtime import ProtocolConfig, TrustedRuntime, init_state
from ginn_jax._src.trusted.transforms import OptimizerConfig, make_update_transform
from ginn_jax._src.types import Batch
from ginn_jax._src.worker.honest import HonestWorker

BOOKKEEPING = ("validate", "digest", "mac_coin", "transfer")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  """What to measure.

  Attributes:
    model: "mnist_cnn" (on mnist5k) or "vgg11" (on CIFAR-sized random data).
    batch_size: examples per step.
    steps: timed steps per block.
    warmup: untimed steps before the first block of each configuration (GINN
      configurations with p > 0 also compile their verification path).
    repeats: blocks per configuration (the median is reported).
    ps: verification probabilities for GINN.
    modes: "sync" and/or "deferred".
    clip_value: element-wise clip bound.
  """

  model: str = "mnist_cnn"
  batch_size: int = 64
  steps: int = 20
  warmup: int = 3
  repeats: int = 5
  ps: tuple[float, ...] = (0.0, 0.01, 0.05, 0.1, 0.5)
  modes: tuple[str, ...] = ("sync", "deferred")
  clip_value: float = 0.01


def _data(cfg: BenchConfig):
  if cfg.model == "vgg11":  # CIFAR-10-sized input; contents do not change the cost.
    rng = np.random.default_rng(0)
    n = max(1024, 4 * cfg.batch_size)
    return rng.random((n, 32, 32, 3), dtype=np.float32), rng.integers(0, 10, n).astype(np.int32)
  ds = load_dataset("mnist5k")
  return ds.train_images, ds.train_labels


def _rss_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * resource.getpagesize()


class _Fused:
  """The usual fused jitted train step, pinned to one device (the baselines)."""

  def __init__(self, model, tx, images, labels, device, batch_size, seed=0):
    grad_fn = compute_grads(model.loss)

    def step(params, opt_state, images, labels, indices, key):
      _, grads = grad_fn(params, Batch(images[indices], labels[indices]), key)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    self._step = jax.jit(step, donate_argnums=(0, 1))
    self.device = device
    streams = keys.seed_streams(seed)
    state = init_state(model, tx, streams.init_key)
    self.params, self.opt_state = jax.device_put((state.params, state.opt_state), device)
    self.images, self.labels = jax.device_put((images, labels), device)
    self.schedule = keys.BatchSchedule(streams.data_key, len(images), batch_size)
    self.streams = streams
    self.t = 0

  def run(self, n: int) -> None:
    for _ in range(n):
      idx, key = jax.device_put(
          (self.schedule.indices(self.t), keys.layer_key(self.streams, self.t)), self.device)
      with jax.default_matmul_precision("highest"):
        self.params, self.opt_state = self._step(self.params, self.opt_state, self.images,
                                                 self.labels, idx, key)
      self.t += 1
    jax.block_until_ready(self.params)


class _Ginn:
  def __init__(self, model, images, labels, protocol, worker, deferred):
    self.runtime = TrustedRuntime(model, images, labels, protocol, tolerance=verify.DEFAULT_FLOOR,
                                  audit_secret=b"bench-secret-" + bytes(20), deferred=deferred,
                                  max_pending=4)
    self.worker = worker

  def run(self, n: int) -> None:
    rt = self.runtime
    for _ in range(n):
      report = self.worker(rt.next_order())
      # The trusted side needs the report's bytes anyway; waiting here keeps the
      # worker's compute out of the "validate" phase of the bookkeeping figure.
      jax.block_until_ready(report.grads)
      rt.submit(report)
    rt.finalize()  # Deferred checks count against the block that queued them.
    jax.block_until_ready(rt.state.params)


def run_bench(cfg: BenchConfig = BenchConfig(), *, progress: bool = True) -> dict[str, Any]:
  """Measures every configuration; returns the table as a dict (what --json writes)."""
  images, labels = _data(cfg)
  model = get_model(cfg.model, input_shape=images.shape[1:], num_classes=10)
  opt = OptimizerConfig()
  tx = make_update_transform("elementwise", cfg.clip_value, opt)
  wdev, tdev = worker_device(), trusted_device()
  worker = HonestWorker(model, images, labels, device=wdev)

  runners: dict[str, Callable[[int], None]] = {
      "unprotected": _Fused(model, tx, images, labels, wdev, cfg.batch_size).run,
      "pure_tee": _Fused(model, tx, images, labels, tdev, cfg.batch_size).run,
  }
  ginns: dict[str, _Ginn] = {}
  for mode in cfg.modes:
    for p in cfg.ps:
      protocol = ProtocolConfig(seed=0, batch_size=cfg.batch_size, p=p, clip="elementwise",
                                clip_value=cfg.clip_value, optimizer=opt)
      g = _Ginn(model, images, labels, protocol, worker, deferred=(mode == "deferred"))
      ginns[f"ginn_{mode}_p{p:g}"] = g
      runners[f"ginn_{mode}_p{p:g}"] = g.run

  for run in runners.values():
    run(cfg.warmup)
  for g in ginns.values():  # Compile the verification path too, before any timed block.
    if g.runtime.config.p > 0:
      g.runtime.compile_verification()
  for g in ginns.values():
    g.runtime.reset_phase_seconds()
  times: dict[str, list[float]] = {name: [] for name in runners}
  rss: dict[str, int] = {}
  bar = tqdm(total=cfg.repeats * len(runners), desc="ginn bench", disable=not progress, leave=False)
  for _ in range(cfg.repeats):
    for name, run in runners.items():
      t0 = time.perf_counter()
      run(cfg.steps)
      times[name].append((time.perf_counter() - t0) / cfg.steps)
      rss[name] = max(rss.get(name, 0), _rss_bytes())
      bar.update(1)
  bar.close()
  for g in ginns.values():
    g.runtime.close()

  t_u = statistics.median(times["unprotected"])
  t_tee = statistics.median(times["pure_tee"])
  rows = []
  for name, ts in times.items():
    t = statistics.median(ts)
    row: dict[str, Any] = {
        "config": name, "step_seconds": t, "steps_per_s": 1.0 / t,
        "vs_unprotected": t / t_u,  # Step time relative to unprotected (>= 1 is slower).
        "speedup_vs_pure_tee": t_tee / t, "rss_mib": rss[name] / 2**20,
    }
    if name in ginns:
      rt = ginns[name].runtime
      mode, p = name.split("_")[1], float(name.split("_p")[1])
      ideal = t_u + p * t_tee if mode == "sync" else max(t_u, p * t_tee)
      phases = rt.phase_seconds
      timed = cfg.steps * cfg.repeats
      row.update({
          "mode": mode, "p": p, "ideal_speedup_vs_pure_tee": t_tee / ideal,
          "bound_1_over_p": None if p == 0 else 1.0 / p,
          "fraction_of_bound": None if p == 0 else (t_tee / t) * p,
          "bookkeeping_fraction": sum(phases.get(k, 0.0) for k in BOOKKEEPING) / (t * timed),
          "phase_ms_per_step": {k: 1e3 * v / timed for k, v in sorted(phases.items())},
          "steps_verified": rt.num_verified,
      })
    rows.append(row)
  nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(
      ginns[next(iter(ginns))].runtime.state.params)) if ginns else 0
  return {
      "config": dataclasses.asdict(cfg),
      "worker_device": f"{wdev} ({wdev.device_kind})",
      "trusted_device": f"{tdev} ({tdev.device_kind})",
      "jax_version": jax.__version__,
      "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
      "param_bytes": int(nbytes),
      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      "digest_gb_per_s": _digest_throughput(),
      "rows": rows,
  }


def _digest_throughput(nbytes: int = 64 * 2**20) -> dict[str, float]:
  """Hash throughput on this machine (what the per-step digest costs per GB)."""
  import hashlib
  data = memoryview(np.random.default_rng(0).random(nbytes // 4, dtype=np.float32)).cast("B")
  out = {}
  for name in ("sha256", "blake2b"):
    t0 = time.perf_counter()
    hashlib.new(name, data).digest()
    out[name] = nbytes / (time.perf_counter() - t0) / 1e9
  return out


def format_table(result: dict[str, Any]) -> str:
  """The bench result as a fixed-width text table."""
  head = ("config", "steps/s", "x unprot", "x TEE", "ideal x TEE", "1/p", "bookkeep", "RSS MiB")
  lines = [f"worker: {result['worker_device']}   trusted: {result['trusted_device']}   "
           f"model: {result['config']['model']} batch {result['config']['batch_size']}",
           "  ".join(f"{h:>12}" if i else f"{h:<20}" for i, h in enumerate(head))]
  fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
  for r in result["rows"]:
    cells = [fmt(r["steps_per_s"], ".2f"), fmt(r["vs_unprotected"], ".3f"),
             fmt(r["speedup_vs_pure_tee"], ".2f"), fmt(r.get("ideal_speedup_vs_pure_tee"), ".2f"),
             fmt(r.get("bound_1_over_p"), ".0f"), fmt(r.get("bookkeeping_fraction"), ".2%"),
             fmt(r["rss_mib"], ".0f")]
    lines.append(f"{r['config']:<20}" + "".join(f"  {c:>12}" for c in cells))
  lines.append("digest throughput (GB/s): " + ", ".join(
      f"{k} {v:.2f}" for k, v in result["digest_gb_per_s"].items()))
  return "\n".join(lines)


def write_json(result: dict[str, Any], path: str) -> None:
  with open(path, "w") as f:
    json.dump(result, f, indent=2, sort_keys=True)
