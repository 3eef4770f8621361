"""`ginn bench`: GINN against unprotected and pure-TEE training, in one process.

Every configuration is measured in the same process, interleaved (one block
of each configuration per repetition, so drifts of a noisy machine hit all of
them alike), after warm-up, and reported as the median over repetitions:

* ``unprotected``: the usual fused jitted train step (gradient, clip, update)
  on the worker device; no integrity at all.
* ``pure_tee``: the same fused step on the trusted CPU device.
* ``ginn``: the protocol (work order -> worker -> validate, digest, MAC, coin,
  clip+update, verify) at each p, synchronous and deferred; and at p = 0 with
  witness checks at each p_witness (the worker then keeps each step's witness).

``ceiling`` (`measure_ceiling`): the trusted side's own cost per step with a
worker that costs nothing, against the memory floor of the bytes a step must
touch and a pure-TEE step (docs/performance.md, "The ceiling").

``shards`` (`measure_shards`, only with ``only="shards"``): the protocol's
cost per step with S shards against one at the same total batch (the
trusted side's cost with recorded reports, and the whole step with a live
`ShardedWorker`), and the trusted re-computation of one shard against that
of the whole batch (docs/performance.md, "Shards"). It needs 1 + max(S)
devices: ``ginn bench --only shards`` re-runs itself with that many forced
CPU devices when the process has fewer.

``check_cost`` (measured the same way, per step) compares the trusted side's
two checks of one step: ``recompute_ms``, re-computing the step's gradient and
comparing it with the report, against ``witness_ms``, the witness check
(validating, BLAKE3 hashing and moving the witness, then the Freivalds
checks), and the worker's cost of producing the witness
(``witness_step_ratio``: its gradient+witness pass over the fused gradient
pass).

Speed model (docs/design.md section 8): with T_u the unprotected step and T_tee the
pure-TEE step, the ideal GINN step is T_u + p*T_tee (synchronous) or
max(T_u, p*T_tee) (deferred); the speedup over pure TEE is bounded by 1/p.
With witness checks (T_w the witness check) the ideal step is
T_u + p*T_tee + p_witness*T_w (sync) or max(T_u, p*T_tee + p_witness*T_w)
(deferred).
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import resource
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import jax
import numpy as np
import optax

from ginn_jax._src import errors
from ginn_jax._src import progress as progress_lib
from ginn_jax._src.boundary import ProjectionRequest, WitnessRequest
from ginn_jax._src.data import as_training_data, load_dataset, num_examples
from ginn_jax._src.devices import trusted_device, worker_device
from ginn_jax._src.models import get_model, is_language_model, lm_training_data
from ginn_jax._src.step import compute_grads, gather
from ginn_jax._src.trusted import commit, keys, projection, verify
from ginn_jax._src.trusted import witness as witness_lib
from ginn_jax._src.trusted.runtime import ProtocolConfig, TrustedRuntime, init_state
from ginn_jax._src.trusted.transforms import OptimizerConfig, make_update_transform
from ginn_jax._src.trusted.verifier import Check
from ginn_jax._src.types import Batch
from ginn_jax._src.worker.honest import HonestWorker
from ginn_jax._src.worker.sharded import ShardedWorker, default_mesh

BOOKKEEPING = ("receive", "digest", "mac_coin")
ONLY = ("check-cost", "ceiling", "shards")
# The attack the ceiling's witness figure is sized against: 0.999 detection of a
# backdoor that needs k = 16 malicious steps (the fewest measured, docs/experiments.md).
CEILING_TARGET, CEILING_K = 0.999, 16


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
    p_witnesses: witness-check probabilities for GINN rows at p = 0 (layered
      models only; empty for none).
    check_repeats: interleaved repetitions of the check-cost measurement
      (after one warm-up round; the median is reported). None: as many as
      fit in `check_budget_s`, at least 3 and at most 21.
    check_budget_s: seconds of timed repetitions when `check_repeats` is None
      (a VGG-11 step on a 2-core CPU takes several seconds, an MNIST CNN
      step a few milliseconds).
    check_settle_s: untimed pause before each timed part of the check-cost
      measurement. On a CPU worker, the trusted side's work right after a
      large XLA computation runs several times slower for a moment (measured:
      validating a VGG-11 witness takes ~50 ms right after a worker step,
      ~12 ms 0.2 s later), which is the worker's cost, not the check's.
    ceiling_steps: recorded honest steps the ceiling measurement replays.
    ceiling_repeats: interleaved replays of them per configuration (the
      median is reported).
    shard_counts: the shard counts ``only="shards"`` compares (the first is
      the baseline; each must divide `batch_size`).
    shard_steps: recorded steps per shard count the shard measurement replays.
    shard_repeats: interleaved repetitions of the shard measurement.
    shard_mode: the shard mode it measures for S > 1 ("aggregate" or
      "per_shard"; S = 1 is a run without shards either way).
    only: None (everything but ``shards``), "check-cost" (only ``check_cost``),
      "ceiling" (only ``ceiling``) or "shards" (only ``shards``).
    lora_rank: fine-tune `model` with LoRA adapters of this rank on every
      kernel (`ginn_jax.lora`, alpha = 2 x rank), its base frozen: the trusted
      side then receives, hashes, clips and updates the adapters only. None:
      train every parameter.
  """

  model: str = "mnist_cnn"
  batch_size: int = 64
  steps: int = 20
  warmup: int = 3
  repeats: int = 5
  ps: tuple[float, ...] = (0.0, 0.01, 0.05, 0.1, 0.5)
  modes: tuple[str, ...] = ("sync", "deferred")
  clip_value: float = 0.01
  p_witnesses: tuple[float, ...] = (0.1, 0.5, 1.0)
  check_repeats: int | None = None
  check_budget_s: float = 90.0
  check_settle_s: float = 0.2
  ceiling_steps: int = 8
  ceiling_repeats: int = 7
  shard_counts: tuple[int, ...] = (1, 2, 4)
  shard_steps: int = 8
  shard_repeats: int = 7
  only: str | None = None
  lora_rank: int | None = None
  shard_mode: str = "aggregate"

  def __post_init__(self):
    if self.only is not None and self.only not in ONLY:
      raise ValueError(f"only must be None or one of {ONLY}, got {self.only!r}")
    if self.check_repeats is not None and self.check_repeats < 1:
      raise ValueError(f"check_repeats must be >= 1, got {self.check_repeats!r}")
    if self.ceiling_steps < 1 or self.ceiling_repeats < 1:
      raise ValueError(f"ceiling_steps and ceiling_repeats must be >= 1, got "
                       f"{self.ceiling_steps!r}, {self.ceiling_repeats!r}")
    if self.lora_rank is not None and not (isinstance(self.lora_rank, int) and self.lora_rank >= 1):
      raise ValueError(f"lora_rank must be a positive int or None, got {self.lora_rank!r}")
    if self.shard_mode not in ("per_shard", "aggregate"):
      raise ValueError(f"shard_mode must be 'per_shard' or 'aggregate', got {self.shard_mode!r}")


def _data(cfg: BenchConfig):
  if is_language_model(cfg.model):  # The pydoc windows as one pytree (no labels).
    return lm_training_data(), None
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

  def __init__(self, model, tx, images, labels, device, batch_size, seed=0, frozen=None):
    grad_fn = compute_grads(model.loss)

    def step(params, opt_state, data, indices, key, frozen):
      _, grads = grad_fn(params, gather(data, indices), key, frozen)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    self._step = jax.jit(step, donate_argnums=(0, 1))
    self.device = device
    streams = keys.seed_streams(seed)
    state = init_state(model, tx, streams.init_key)
    self.params, self.opt_state = jax.device_put((state.params, state.opt_state), device)
    data = as_training_data(images, labels)
    self.data, self.frozen = jax.device_put((data, frozen), device)
    self.schedule = keys.BatchSchedule(streams.data_key, num_examples(data), batch_size)
    self.streams = streams
    self.t = 0

  def run(self, n: int) -> None:
    for _ in range(n):
      idx, key = jax.device_put(
          (self.schedule.indices(self.t), keys.layer_key(self.streams, self.t)), self.device)
      with jax.default_matmul_precision("highest"):
        self.params, self.opt_state = self._step(self.params, self.opt_state, self.data, idx, key,
                                                 self.frozen)
      self.t += 1
    jax.block_until_ready(self.params)


class _Ginn:
  def __init__(self, model, images, labels, protocol, worker, deferred):
    self.runtime = TrustedRuntime(model, images, labels, protocol, tolerance=verify.DEFAULT_FLOOR,
                                  audit_secret=b"bench-secret-" + bytes(20), deferred=deferred,
                                  max_pending=4)
    self.worker = worker
    # Asked only on steps drawn for a witness check (as in `ginn_jax.train`).
    self.witness = getattr(worker, "witness", None)

  def run(self, n: int) -> None:
    rt = self.runtime
    for _ in range(n):
      report = self.worker(rt.next_order())
      # The trusted side needs the report's bytes anyway; waiting here keeps the
      # worker's compute out of the "validate" phase of the bookkeeping figure.
      jax.block_until_ready(report.grads)
      rt.submit(report, witness=self.witness)
    rt.finalize()  # Deferred checks count against the block that queued them.
    jax.block_until_ready(rt.state.params)


def _ms(ts: list[float]) -> float:
  return 1e3 * statistics.median(ts)


def measure_check_cost(model, images, labels, cfg: BenchConfig, wdev: jax.Device, *,
                       progress: bool = False) -> dict[str, Any]:
  """The trusted cost of checking one step by re-computation and by its witness,
  and the worker's cost of producing the witness, measured in this process.

  One step's report and witness come from an `HonestWorker` (witness="keep")
  on `wdev`. Each repetition times, once each and interleaved (in reverse
  order every other repetition; after an untimed round that compiles
  everything), `cfg.check_repeats` times (or as many as fit in
  `cfg.check_budget_s`, 3 to 21):

  * recompute: the runtime's ``_recompute`` of a re-computation `Check`
    (trusted gradient of the step, comparison with the report);
  * witness: what the runtime does for a witness check: `validate_witness`
    (which reads the witness off the worker), ``receive_witness`` (moves it to
    the trusted device, starts the vector-free part of the check and
    meanwhile hashes it with BLAKE3, derives the vectors' seed), then
    ``_recompute`` of a witness-only `Check` (the Freivalds checks);
  * the worker's fused gradient pass and its gradient+witness pass (the same
    work order, on the worker device).

  Returns medians in milliseconds: ``recompute_ms``, ``witness_ms``, ``ratio``
  (recompute_ms / witness_ms), ``witness_mib``, ``fused_step_ms``,
  ``witness_step_ms``, ``witness_step_ratio`` (witness_step_ms /
  fused_step_ms), ``witness_parts_ms`` (validate, receive, freivalds),
  ``repeats`` and the honest checks' largest errors (both must pass).
  """
  protocol = ProtocolConfig(seed=0, batch_size=cfg.batch_size, p=1.0, p_witness=1.0,
                            clip="elementwise", clip_value=cfg.clip_value, optimizer=OptimizerConfig())
  rt = TrustedRuntime(model, images, labels, protocol, tolerance=verify.DEFAULT_FLOOR,
                      audit_secret=b"bench-secret-" + bytes(20))
  worker = HonestWorker(model, images, labels, device=wdev, witness="keep", frozen=rt.frozen)
  order = rt.next_order()
  t = order.step
  report = worker(order)
  wit = worker.witness(WitnessRequest(step=t, order=order))
  leaves, loss = commit.validate_report(report, step=t, params=rt.state.params)
  report_digest = commit.report_digest(t, leaves, loss)
  spec = rt.witness_spec()
  plan = rt.witness_plan()
  base = dict(step=t, params=rt.state.params, batch_indices=order.batch_indices,
              reported=jax.device_put(leaves, rt.device), loss=loss)
  layer_key = lambda: keys.layer_key(rt.streams, t)  # noqa: E731  (a fresh key per use)

  def recompute() -> verify.Comparison:
    comparison, _ = rt._recompute(Check(**base, layer_key=layer_key(), recompute=True))
    return comparison

  parts: dict[str, list[float]] = {k: [] for k in ("validate", "receive", "freivalds")}

  def witness_check() -> verify.Comparison:
    t0 = time.perf_counter()
    outputs, input_grads = witness_lib.validate_witness(wit, step=t, spec=spec)
    t1 = time.perf_counter()
    # Moves the witness, starts its vector-free part and hashes it meanwhile.
    moved, _, seed = rt.receive_witness(t, report_digest, order.batch_indices, layer_key(),
                                        outputs, input_grads)
    t2 = time.perf_counter()
    _, result = rt._recompute(Check(**base, layer_key=layer_key(), recompute=False, witness=moved,
                                    witness_seed=seed))
    t3 = time.perf_counter()
    for k, a, b in (("validate", t0, t1), ("receive", t1, t2), ("freivalds", t2, t3)):
      parts[k].append(b - a)
    return result

  def fused_step():
    jax.block_until_ready(worker.grad_fn(order.params, order.batch_indices, layer_key()))

  def witness_step():
    jax.block_until_ready(worker.witness_fn(order.params, order.batch_indices, layer_key()))

  timed: dict[str, Callable[[], Any]] = {"recompute": recompute, "witness": witness_check,
                                         "fused_step": fused_step, "witness_step": witness_step}
  for name, f in timed.items():  # Warm-up: compiles every path.
    if name != "witness_step":  # Compiled and run by `worker(order)` above.
      f()
  for v in parts.values():
    v.clear()
  times: dict[str, list[float]] = {k: [] for k in timed}
  results: dict[str, Any] = {}
  fixed = cfg.check_repeats is not None
  bar = progress_lib.bar(total=cfg.check_repeats if fixed else None, desc="check cost",
                         enabled=progress)
  start = time.perf_counter()
  while True:
    n = len(times["recompute"])
    if (n >= cfg.check_repeats if fixed else
        n >= 21 or (n >= 3 and time.perf_counter() - start >= cfg.check_budget_s)):
      break
    # Alternate the order (ABCD DCBA ...) so a drifting machine hits every part alike.
    for name, f in (list(timed.items()) if n % 2 == 0 else list(timed.items())[::-1]):
      time.sleep(cfg.check_settle_s)
      t0 = time.perf_counter()
      results[name] = f()
      times[name].append(time.perf_counter() - t0)
    bar.update(1)
  bar.close()
  rt.close()
  # Both checks of an honest step must pass, or the timing is of the wrong path.
  verify.check(results["recompute"], rt.tolerance, step=t)
  verify.check(results["witness"], rt.witness_tolerance, step=t,
               violation=errors.WitnessViolation)
  recompute_ms, witness_ms = _ms(times["recompute"]), _ms(times["witness"])
  fused_ms, wstep_ms = _ms(times["fused_step"]), _ms(times["witness_step"])
  return {
      "recompute_ms": recompute_ms,
      "witness_ms": witness_ms,
      "ratio": recompute_ms / witness_ms,
      "witness_mib": spec.nbytes / 2**20,
      "plan": {"products": len(plan.products), "witness_mib": plan.witness_mib, "digest": plan.digest},
      "witness_parts_ms": {k: _ms(v) for k, v in parts.items()},
      "fused_step_ms": fused_ms,
      "witness_step_ms": wstep_ms,
      "witness_step_ratio": wstep_ms / fused_ms,
      "repeats": len(times["recompute"]),
      "witness_max_rel_l2": results["witness"].max_rel_l2,
      "witness_max_abs": results["witness"].max_max_abs,
      "recompute_max_rel_l2": results["recompute"].max_rel_l2,
  }


def memory_bandwidth(nbytes: int = 256 * 2**20, repeats: int = 7) -> dict[str, float]:
  """Memory bandwidth of this host in GB/s, as the best of `repeats` copies of
  `nbytes` (counting the bytes read and written): ``all_cores`` with one thread
  per core, each copying its slice (numpy's copy releases the GIL), as a TEE
  host would use them; ``one_thread`` for comparison."""
  src = np.ones(nbytes // 4, np.float32)
  dst = np.empty_like(src)
  n = os.cpu_count() or 1
  bounds = np.linspace(0, src.size, n + 1).astype(int)
  parts = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]

  def best(copy) -> float:
    ts = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      copy()
      ts.append(time.perf_counter() - t0)
    return 2 * nbytes / min(ts) / 1e9

  with ThreadPoolExecutor(n) as pool:
    all_cores = best(lambda: list(pool.map(lambda s: np.copyto(dst[s], src[s]), parts)))
  return {"all_cores": all_cores, "one_thread": best(lambda: np.copyto(dst, src)), "threads": n}


def _nbytes(tree) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)))


def replay_seconds(rt: TrustedRuntime, initial, reports, *, witness=None, project=None) -> float:
  """Seconds per step for `rt`, restored to `initial`, to take `reports` again
  (recorded from an honest worker, so the trajectory is the same and every
  report is accepted): the trusted side's own cost, the worker's none."""
  rt.restore(initial, [], 0)
  t0 = time.perf_counter()
  for report in reports:
    rt.next_order()
    rt.submit(report, witness=witness, project=project)
    jax.block_until_ready(rt.state.params)
  return (time.perf_counter() - t0) / len(reports)


def measure_ceiling(model, images, labels, cfg: BenchConfig, wdev: jax.Device, *,
                    progress: bool = False, report_digest: str = commit.DEFAULT_DIGEST) -> dict[str, Any]:
  """The trusted side's own cost per step, with a worker that costs nothing.

  An `HonestWorker` on `wdev` computes `cfg.ceiling_steps` steps (and, for a
  layered model, their witnesses); its reports, kept computed on `wdev`, are
  then replayed into a runtime restored to step 0 (the same reports give the
  same trajectory, so every replayed report and witness is honest). A timed step is
  ``next_order`` + ``submit`` + waiting for the update: receiving, checking,
  hashing, MAC and coins, and the clipped update, synchronised.

  Returns (milliseconds per step, medians over `cfg.ceiling_repeats`
  interleaved replays):
    ``trusted_ms`` (p = 0), ``floor_ms`` (the bytes a step must touch: read the
    report, read and write parameters and optimizer state, over the memory
    bandwidth measured here), ``pure_tee_ms`` (a fused step on the trusted
    device), ``ceiling_speedup`` (pure_tee_ms / trusted_ms), ``vs_floor``
    (trusted_ms / floor_ms); for a layered model also ``trusted_ms_witness``
    (every step's witness checked), ``p_witness`` (the rate that detects a
    k = 16 attack with probability 0.999), ``trusted_ms_at_p_witness``
    ((1 - p_witness) trusted_ms + p_witness trusted_ms_witness) and
    ``ceiling_speedup_at_p_witness``; ``phase_ms`` (where the p = 0 step's time
    goes), byte counts and the bandwidth.
  """
  from ginn_jax._src import analysis

  n = cfg.ceiling_steps
  opt = OptimizerConfig()
  witness = True  # Every model has a witness (its program's products).
  p_needed = analysis.required_p_witness(CEILING_TARGET, CEILING_K) if witness else 0.0
  base = ProtocolConfig(seed=0, batch_size=cfg.batch_size, p=0.0, p_witness=0.0, clip="elementwise",
                        clip_value=cfg.clip_value, optimizer=opt)
  runtimes = {"p0": TrustedRuntime(model, images, labels, base, audit_secret=b"ceiling-" + bytes(24),
                                   report_digest=report_digest)}
  if witness:
    runtimes["witness"] = TrustedRuntime(
        model, images, labels, dataclasses.replace(base, p_witness=1.0),
        audit_secret=b"ceiling-" + bytes(24), report_digest=report_digest)
  # Record: the honest worker's reports and witnesses of steps 0..n-1. They stay
  # on the worker's device, computed: replaying them costs the worker nothing,
  # and the trusted side receives them as it would a fresh report.
  rec = runtimes["p0"]
  initial = rec.state
  worker = HonestWorker(model, images, labels, device=wdev, witness="keep" if witness else "recompute",
                        frozen=rec.frozen)
  reports, witnesses = [], {}
  for _ in progress_lib.bar(range(n), desc="ceiling: record", enabled=progress):
    order = rec.next_order()
    report = worker(order)
    if witness:
      witnesses[order.step] = worker.witness(WitnessRequest(step=order.step, order=order))
    jax.block_until_ready((report.grads, witnesses.get(order.step)))
    reports.append(report)
    rec.submit(report)
  answer = lambda request: witnesses[request.step]  # noqa: E731

  def replay(rt: TrustedRuntime) -> float:
    return replay_seconds(rt, initial, reports, witness=answer)

  for rt in runtimes.values():  # Warm-up: compiles every path.
    if rt.config.p_witness > 0:
      rt.compile_verification()
    replay(rt)
    rt.reset_phase_seconds()
  tx = make_update_transform("elementwise", cfg.clip_value, opt)
  tee = _Fused(model, tx, images, labels, trusted_device(), cfg.batch_size, frozen=rec.frozen)
  tee.run(1)
  times: dict[str, list[float]] = {k: [] for k in [*runtimes, "pure_tee"]}
  bar = progress_lib.bar(total=cfg.ceiling_repeats, desc="ceiling", enabled=progress)
  for i in range(cfg.ceiling_repeats):
    order = list(times) if i % 2 == 0 else list(times)[::-1]  # A drifting machine hits all alike.
    for name in order:
      if name == "pure_tee":
        t0 = time.perf_counter()
        tee.run(1)
        times[name].append(time.perf_counter() - t0)
      else:
        times[name].append(replay(runtimes[name]))
    bar.update(1)
  bar.close()
  bandwidth = memory_bandwidth()
  for rt in runtimes.values():
    rt.close()
  state = initial
  report_b, param_b, opt_b = _nbytes(reports[0].grads), _nbytes(state.params), _nbytes(state.opt_state)
  touched = report_b + 2 * param_b + 2 * opt_b
  trusted_ms, pure_tee_ms = _ms(times["p0"]), _ms(times["pure_tee"])
  floor_ms = 1e3 * touched / (bandwidth["all_cores"] * 1e9)
  timed = n * cfg.ceiling_repeats
  out: dict[str, Any] = {
      "trusted_ms": trusted_ms,
      "floor_ms": floor_ms,
      "pure_tee_ms": pure_tee_ms,
      "ceiling_speedup": pure_tee_ms / trusted_ms,
      "vs_floor": trusted_ms / floor_ms,
      "phase_ms": {k: 1e3 * v / timed for k, v in sorted(runtimes["p0"].phase_seconds.items())},
      "report_digest": report_digest,
      "report_bytes": report_b,
      "param_bytes": param_b,
      "opt_state_bytes": opt_b,
      "bytes_touched": touched,
      "bandwidth_gb_per_s": bandwidth,
      "steps": n,
      "repeats": cfg.ceiling_repeats,
  }
  if witness:
    tw = _ms(times["witness"])
    at_p = (1 - p_needed) * trusted_ms + p_needed * tw
    out.update({
        "trusted_ms_witness": tw,
        "p_witness": p_needed,
        "p_witness_target": {"detection": CEILING_TARGET, "k": CEILING_K},
        "trusted_ms_at_p_witness": at_p,
        "ceiling_speedup_at_p_witness": pure_tee_ms / at_p,
    })
  return out


def measure_shards(model, images, labels, cfg: BenchConfig, *, progress: bool = False) -> dict[str, Any]:
  """The protocol's cost with S shards against S = ``cfg.shard_counts[0]``
  (1), at the same total batch ``cfg.batch_size``, measured in this process.

  For each S, a `ShardedWorker` over `default_mesh(S)` (S devices when the
  process has them) records ``cfg.shard_steps`` honest reports; then, per
  repetition (interleaved, the order reversed every other one):

  * ``trusted_ms``: the recorded reports replayed into a runtime restored to
    step 0 at p = 0: ``next_order`` + ``submit`` + waiting for the update
    (receive, digest, MAC, coins and the clip-each-then-mean update);
  * ``step_ms``: live steps, the worker computing every shard, p = 0;
  * ``recompute_ms``: the trusted re-computation and comparison of one
    shard (S > 1) or of the whole batch (S = 1).

  In ``cfg.shard_mode == "aggregate"`` (S > 1) the reports are the shards'
  means, and every step includes the projection challenge: the recorded
  answers (the worker's projections, kept on its devices) are replayed with
  the reports, so ``trusted_ms`` counts the trusted side's own work (drawing
  the vectors, projecting the mean, receiving and checking the scalars), the
  worker's none; ``recompute_ms`` re-computes one shard and compares its
  projections. ``mode`` in the result names the mode.

  Returns medians in milliseconds per S (keys ``"1"``, ``"2"``, ...) and the
  ratios against the baseline: ``trusted_ratio`` and ``step_ratio`` (goal:
  within 1.10), ``recompute_ratio`` (goal: about 1/S).
  """
  counts = tuple(cfg.shard_counts)
  n = cfg.shard_steps
  opt = OptimizerConfig()
  setups = {}
  for S in counts:
    protocol = ProtocolConfig(seed=0, batch_size=cfg.batch_size, p=0.0, clip="elementwise",
                              clip_value=cfg.clip_value, optimizer=opt, num_shards=S,
                              shard_mode=cfg.shard_mode)
    rt = TrustedRuntime(model, images, labels, protocol, audit_secret=b"shards-" + bytes(25))
    live = TrustedRuntime(model, images, labels, protocol, audit_secret=b"shards-" + bytes(25))
    worker = ShardedWorker(model, images, labels, num_shards=S, mesh=default_mesh(S),
                           shard_mode=protocol.shard_mode)
    initial = rt.state
    reports, answers = [], {}
    project = worker.project if protocol.aggregate else None

    def record(request, answers=answers, worker=worker):
      answers[request.step] = worker.project(request)
      jax.block_until_ready(answers[request.step].values)
      return answers[request.step]

    for _ in range(n):  # Record honest reports (computed, kept on the worker's devices).
      report = worker(rt.next_order())
      jax.block_until_ready((report.grads, report.loss))
      reports.append(report)
      rt.submit(report, project=record if protocol.aggregate else None)
    order = rt.next_order()
    indices, key = order.batch_indices, order.layer_key
    if S == 1:
      check = Check(step=order.step, params=order.params, batch_indices=indices, layer_key=key,
                    reported=[], loss=np.float32(0), recompute=True)
    else:
      check = Check(step=order.step, params=order.params, batch_indices=indices, layer_key=key,
                    reported=[], loss=np.zeros(S, np.float32), recompute=True, shards=(0,))
    report = worker(order)
    leaves, loss = commit.validate_report(report, step=order.step, params=order.params, num_shards=S,
                                          aggregate=protocol.aggregate)
    check = dataclasses.replace(check, reported=jax.device_put(leaves, rt.device), loss=loss)
    if protocol.aggregate:  # The projected check of one shard, against honest scalars.
      vectors = projection.projection_vectors(np.array([1, 2], np.uint32), [x.shape for x in leaves],
                                              rt.device)
      values = np.asarray(jax.device_get(worker.project(
          ProjectionRequest(step=order.step, order=order, vectors=vectors)).values), np.float32)
      check = dataclasses.replace(check, projection=(vectors, values))
    setups[S] = (rt, live, worker, initial, reports, check, answers, project)

  def replay(S) -> float:
    rt, _, _, initial, reports, _, answers, project = setups[S]
    return replay_seconds(rt, initial, reports,
                          project=None if project is None else (lambda r: answers[r.step]))

  def live_steps(S) -> float:
    _, live, worker, initial, _, _, _, project = setups[S]
    live.restore(initial, [], 0)
    t0 = time.perf_counter()
    for _ in range(n):
      live.submit(worker(live.next_order()), project=project)
      jax.block_until_ready(live.state.params)
    return (time.perf_counter() - t0) / n

  def recompute(S) -> float:
    rt, *_, check, _, _ = setups[S]
    t0 = time.perf_counter()
    comparison, _ = rt._recompute(check)
    verify.check(comparison, rt.tolerance, step=check.step)  # An honest report: it must pass.
    return time.perf_counter() - t0

  parts = {"trusted": replay, "step": live_steps, "recompute": recompute}
  for S in counts:  # Warm-up: compiles every path.
    for f in parts.values():
      f(S)
  times = {(name, S): [] for name in parts for S in counts}
  bar = progress_lib.bar(total=cfg.shard_repeats, desc="shards", enabled=progress)
  for i in range(cfg.shard_repeats):
    runs = [(name, S) for name in parts for S in counts]
    for name, S in (runs if i % 2 == 0 else runs[::-1]):
      times[name, S].append(parts[name](S))
    bar.update(1)
  bar.close()
  for rt, live, *_ in setups.values():
    rt.close()
    live.close()
  base = counts[0]
  out: dict[str, Any] = {"mode": cfg.shard_mode, "batch_size": cfg.batch_size,
                         "shard_counts": list(counts), "steps": n,
                         "repeats": cfg.shard_repeats,
                         "devices": {str(S): setups[S][2].mesh.size for S in counts}}
  for name in parts:
    ms = {str(S): _ms(times[name, S]) for S in counts}
    out[f"{name}_ms"] = ms
    out[f"{name}_ratio"] = {str(S): ms[str(S)] / ms[str(base)] for S in counts}
  return out


def run_bench(cfg: BenchConfig = BenchConfig(), *, progress: bool = True) -> dict[str, Any]:
  """Measures every configuration; returns the table as a dict (what --json writes)."""
  load_start = os.getloadavg()[0]
  images, labels = _data(cfg)
  model = get_model(cfg.model, input_shape=getattr(images, "shape", (0, 0, 0, 0))[1:], num_classes=10)
  if cfg.lora_rank is not None:
    if cfg.only not in ("ceiling", "check-cost"):
      raise ValueError("lora_rank is measured by the ceiling and the check cost (only='ceiling' or "
                       "'check-cost')")
    from ginn_jax._src import finetune
    model = finetune.lora(model, rank=cfg.lora_rank, alpha=2.0 * cfg.lora_rank)
  opt = OptimizerConfig()
  tx = make_update_transform("elementwise", cfg.clip_value, opt)
  wdev, tdev = worker_device(), trusted_device()
  check_cost = (measure_check_cost(model, images, labels, cfg, wdev, progress=progress)
                if cfg.only in (None, "check-cost") else None)
  ceiling = (measure_ceiling(model, images, labels, cfg, wdev, progress=progress)
             if cfg.only in (None, "ceiling") else None)
  shards = (measure_shards(model, images, labels, cfg, progress=progress)
            if cfg.only == "shards" else None)
  rows = [] if cfg.only is not None else _rows(cfg, model, images, labels, tx, opt, wdev, tdev,
                                               check_cost, progress)
  params = jax.eval_shape(model.init, keys.seed_streams(0).init_key)
  nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))
  frozen_nbytes = 0
  if cfg.lora_rank is not None:
    frozen_nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(
        jax.eval_shape(model.frozen_params, keys.seed_streams(0).init_key)))
  return {
      "config": dataclasses.asdict(cfg),
      "worker_device": f"{wdev} ({wdev.device_kind})",
      "trusted_device": f"{tdev} ({tdev.device_kind})",
      "jax_version": jax.__version__,
      "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
      "param_bytes": int(nbytes),
      **({"frozen_bytes": int(frozen_nbytes), "lora_rank": cfg.lora_rank} if cfg.lora_rank else {}),
      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      "digest_gb_per_s": _digest_throughput(),
      # Other processes on the machine disturb the timings; a 1-minute load
      # average above the number of cores at either end is a warning sign.
      "load_average_1m": {"start": load_start, "end": os.getloadavg()[0], "cpus": os.cpu_count()},
      "check_cost": check_cost,
      "ceiling": ceiling,
      "shards": shards,
      "rows": rows,
  }


def _rows(cfg, model, images, labels, tx, opt, wdev, tdev, check_cost, progress) -> list[dict]:
  # The rows without witness checks use a worker that computes the plain
  # gradient (it is never asked for a witness); those with witness checks one
  # that keeps each step's witness (computed with the gradient, in one pass).
  worker = HonestWorker(model, images, labels, device=wdev, witness="recompute")
  runners: dict[str, Callable[[int], None]] = {
      "unprotected": _Fused(model, tx, images, labels, wdev, cfg.batch_size).run,
      "pure_tee": _Fused(model, tx, images, labels, tdev, cfg.batch_size).run,
  }
  ginns: dict[str, tuple[_Ginn, str, float, float]] = {}
  p_witnesses = cfg.p_witnesses if check_cost is not None else ()
  witness_worker = (HonestWorker(model, images, labels, device=wdev, witness="keep")
                    if p_witnesses else None)
  for mode in cfg.modes:
    grid = [(p, 0.0) for p in cfg.ps] + [(0.0, pw) for pw in p_witnesses]
    for p, pw in grid:
      protocol = ProtocolConfig(seed=0, batch_size=cfg.batch_size, p=p, p_witness=pw,
                                clip="elementwise", clip_value=cfg.clip_value, optimizer=opt)
      name = f"ginn_{mode}_p{p:g}" + (f"_pw{pw:g}" if pw > 0 else "")
      g = _Ginn(model, images, labels, protocol, witness_worker if pw > 0 else worker,
                deferred=(mode == "deferred"))
      ginns[name] = (g, mode, p, pw)
      runners[name] = g.run

  for run in runners.values():
    run(cfg.warmup)
  for g, *_ in ginns.values():  # Compile the verification path too, before any timed block.
    if g.runtime.config.p > 0 or g.runtime.config.p_witness > 0:
      g.runtime.compile_verification()
  for g, *_ in ginns.values():
    g.runtime.reset_phase_seconds()
  times: dict[str, list[float]] = {name: [] for name in runners}
  rss: dict[str, int] = {}
  bar = progress_lib.bar(total=cfg.repeats * len(runners), desc="ginn bench", enabled=progress)
  for _ in range(cfg.repeats):
    for name, run in runners.items():
      t0 = time.perf_counter()
      run(cfg.steps)
      times[name].append((time.perf_counter() - t0) / cfg.steps)
      rss[name] = max(rss.get(name, 0), _rss_bytes())
      bar.update(1)
  bar.close()
  for g, *_ in ginns.values():
    g.runtime.close()

  t_u = statistics.median(times["unprotected"])
  t_tee = statistics.median(times["pure_tee"])
  t_w = check_cost["witness_ms"] / 1e3 if check_cost is not None else 0.0
  rows = []
  for name, ts in times.items():
    t = statistics.median(ts)
    row: dict[str, Any] = {
        "config": name, "step_seconds": t, "steps_per_s": 1.0 / t,
        "vs_unprotected": t / t_u,  # Step time relative to unprotected (>= 1 is slower).
        "speedup_vs_pure_tee": t_tee / t, "rss_mib": rss[name] / 2**20,
    }
    if name in ginns:
      g, mode, p, pw = ginns[name]
      rt = g.runtime
      check = p * t_tee + pw * t_w
      ideal = t_u + check if mode == "sync" else max(t_u, check)
      phases = rt.phase_seconds
      timed = cfg.steps * cfg.repeats
      row.update({
          "mode": mode, "p": p, "p_witness": pw, "ideal_speedup_vs_pure_tee": t_tee / ideal,
          "bound_1_over_p": None if p == 0 else 1.0 / p,
          "fraction_of_bound": None if p == 0 else (t_tee / t) * p,
          "bookkeeping_fraction": sum(phases.get(k, 0.0) for k in BOOKKEEPING) / (t * timed),
          "phase_ms_per_step": {k: 1e3 * v / timed for k, v in sorted(phases.items())},
          "steps_verified": rt.num_verified,
      })
    rows.append(row)
  return rows


def _digest_throughput(nbytes: int = 64 * 2**20) -> dict[str, float]:
  """Hash throughput on this machine (what the per-step digest costs per GB)."""
  import hashlib
  data = memoryview(np.random.default_rng(0).random(nbytes // 4, dtype=np.float32)).cast("B")
  import blake3
  out = {}
  for name, h in (("sha256", lambda: hashlib.sha256(data)), ("blake2b", lambda: hashlib.blake2b(data)),
                  ("blake3", lambda: blake3.blake3(data, max_threads=blake3.blake3.AUTO))):
    t0 = time.perf_counter()
    h().digest()
    out[name] = nbytes / (time.perf_counter() - t0) / 1e9
  return out


def format_table(result: dict[str, Any]) -> str:
  """The bench result as a fixed-width text table (no table when there are no rows)."""
  head = ("config", "steps/s", "x unprot", "x TEE", "ideal x TEE", "1/p", "bookkeep", "RSS MiB")
  lines = [f"worker: {result['worker_device']}   trusted: {result['trusted_device']}   "
           f"model: {result['config']['model']} batch {result['config']['batch_size']}"]
  if result["rows"]:
    lines.append("  ".join(f"{h:>12}" if i else f"{h:<24}" for i, h in enumerate(head)))
  fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
  for r in result["rows"]:
    cells = [fmt(r["steps_per_s"], ".2f"), fmt(r["vs_unprotected"], ".3f"),
             fmt(r["speedup_vs_pure_tee"], ".2f"), fmt(r.get("ideal_speedup_vs_pure_tee"), ".2f"),
             fmt(r.get("bound_1_over_p"), ".0f"), fmt(r.get("bookkeeping_fraction"), ".2%"),
             fmt(r["rss_mib"], ".0f")]
    lines.append(f"{r['config']:<24}" + "".join(f"  {c:>12}" for c in cells))
  lines.append("digest throughput (GB/s): " + ", ".join(
      f"{k} {v:.2f}" for k, v in result["digest_gb_per_s"].items()))
  return "\n".join(lines)


def format_check_cost(result: dict[str, Any]) -> str:
  """One line: the trusted cost of a re-computation vs a witness check, and the
  worker's cost of producing the witness."""
  c = result.get("check_cost")
  if c is None:
    return "check cost: - (the model has no layered form, so no witness checks)"
  return (f"check cost per step: recompute {c['recompute_ms']:.1f} ms, witness check "
          f"{c['witness_ms']:.1f} ms ({c['witness_mib']:.1f} MiB witness): {c['ratio']:.1f}x cheaper; "
          f"worker witness step {c['witness_step_ms']:.1f} ms = {c['witness_step_ratio']:.3f}x "
          f"fused {c['fused_step_ms']:.1f} ms")


def format_ceiling(result: dict[str, Any]) -> str:
  """The ceiling: the trusted side's cost per step against its memory floor and
  a pure-TEE step (empty when it was not measured)."""
  c = result.get("ceiling")
  if c is None:
    return ""
  line = (f"ceiling ({c['report_digest']} digest): trusted side {c['trusted_ms']:.2f} ms/step at p = 0 "
          f"= {c['vs_floor']:.2f}x its memory floor {c['floor_ms']:.2f} ms "
          f"({c['bytes_touched'] / 2**20:.1f} MiB at {c['bandwidth_gb_per_s']['all_cores']:.1f} GB/s); "
          f"pure TEE {c['pure_tee_ms']:.1f} ms: ceiling speed-up {c['ceiling_speedup']:.0f}x")
  if "trusted_ms_witness" in c:
    line += (f"\n  with witness checks at p_witness = {c['p_witness']:.3f} (0.999 against k = 16): "
             f"{c['trusted_ms_at_p_witness']:.2f} ms/step, ceiling speed-up "
             f"{c['ceiling_speedup_at_p_witness']:.0f}x (every step checked: {c['trusted_ms_witness']:.2f} ms)")
  return line


def format_shards(result: dict[str, Any]) -> str:
  """The shard measurement in a few lines (empty when it was not measured)."""
  c = result.get("shards")
  if c is None:
    return ""
  base = c["shard_counts"][0]
  lines = [f"shards ({c.get('mode', 'per_shard')}) at batch {c['batch_size']} (vs S = {base}; "
           "worker devices per S: "
           + ", ".join(f"S={s}: {d}" for s, d in c["devices"].items()) + ")"]
  for S in c["shard_counts"]:
    k = str(S)
    lines.append(f"  S = {S}: trusted {c['trusted_ms'][k]:.2f} ms/step ({c['trusted_ratio'][k]:.3f}x), "
                 f"whole step {c['step_ms'][k]:.2f} ms ({c['step_ratio'][k]:.3f}x), "
                 f"re-computing {'one shard' if S > 1 else 'the batch'} {c['recompute_ms'][k]:.2f} ms "
                 f"({c['recompute_ratio'][k]:.3f}x; 1/S = {1 / S:.3f})")
  return "\n".join(lines)


def write_json(result: dict[str, Any], path: str) -> None:
  with open(path, "w") as f:
    json.dump(result, f, indent=2, sort_keys=True)
