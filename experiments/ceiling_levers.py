"""The trusted side's levers, one at a time, in one process (docs/performance.md, "The ceiling").

Records a few honest steps (reports computed and kept on the worker device), then
replays them into one runtime restored to step 0, timing each step with the update
waited for (``next_order`` + ``submit`` + ``block_until_ready``), at p = 0. Each
variant switches one lever back to what it replaced; variants are interleaved
(in reverse order every other repetition) so a drifting machine hits them alike:

* ``all``: this release (BLAKE3 on every core for large reports, update
  dispatched before the hash and overlapping it, finiteness from the update's
  own reads);
* ``sha256``: the SHA-256 digest of earlier releases;
* ``serial``: the update waited for before hashing (no overlap);
* ``one_thread``: BLAKE3 on one thread.

``baseline`` times the same replay with no lever switched, and runs on any
release; to time the release before these levers, put it first on the path::

    git worktree add /tmp/before 5d42e13
    PYTHONPATH=/tmp/before python experiments/ceiling_levers.py --model vgg11 --variants baseline

Reproduce the committed results (about 2 minutes each on 2 CPU cores):

    python experiments/ceiling_levers.py --model vgg11 --out docs/results
    python experiments/ceiling_levers.py --model mnist_cnn --steps 32 --out docs/results
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import ginn_jax as ginn  # (before jax: two CPU devices)
import jax
from ginn_jax._src import bench

VARIANTS = ("all", "sha256", "serial", "one_thread")


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", default="vgg11", choices=["vgg11", "mnist_cnn", "mlp"])
  ap.add_argument("--batch-size", type=int, default=None, help="default: 128 for vgg11, else 64")
  ap.add_argument("--steps", type=int, default=4, help="recorded honest steps replayed per timing")
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--variants", default=",".join(VARIANTS),
                  help=f"comma-separated, of {VARIANTS} or 'baseline'")
  ap.add_argument("--out", default=None, help="folder for ceiling_levers_<model>_cpu.json")
  args = ap.parse_args(argv)
  variants = [v for v in args.variants.split(",") if v]
  bs = args.batch_size or (128 if args.model == "vgg11" else 64)
  cfg = bench.BenchConfig(model=args.model, batch_size=bs)
  images, labels = bench._data(cfg)
  model = ginn.get_model(args.model, input_shape=images.shape[1:], num_classes=10)
  proto = ginn.ProtocolConfig(seed=0, batch_size=bs, p=0.0, clip="elementwise", clip_value=0.01)
  rt = ginn.TrustedRuntime(model, images, labels, proto, audit_secret=b"levers-" + bytes(25))
  initial = rt.state
  worker = ginn.HonestWorker(model, images, labels)
  reports = []
  for _ in range(args.steps):
    r = worker(rt.next_order())
    jax.block_until_ready(r.grads)
    reports.append(r)
    rt.submit(r)
  switch = _switches(rt) if set(variants) - {"baseline"} else (lambda v: None)

  def replay() -> float:
    rt.restore(initial, [], 0)
    t0 = time.perf_counter()
    for r in reports:
      rt.next_order()
      rt.submit(r)
      jax.block_until_ready(rt.state.params)
    return (time.perf_counter() - t0) / len(reports)

  for v in variants:  # Warm-up: compiles every path.
    switch(v)
    replay()
  times = {v: [] for v in variants}
  phases: dict[str, dict[str, float]] = {v: {} for v in variants}
  for i in range(args.repeats):
    for v in variants if i % 2 == 0 else variants[::-1]:
      switch(v)
      rt.reset_phase_seconds()
      times[v].append(replay())
      for k, x in rt.phase_seconds.items():
        phases[v][k] = phases[v].get(k, 0.0) + x
  nbytes = lambda tree: sum(x.nbytes for x in jax.tree_util.tree_leaves(tree))  # noqa: E731
  touched = nbytes(reports[0].grads) + 2 * nbytes(initial.params) + 2 * nbytes(initial.opt_state)
  # (A release before the ceiling bench has no bandwidth probe: no floor then.)
  bw = bench.memory_bandwidth() if hasattr(bench, "memory_bandwidth") else None
  floor_ms = 1e3 * touched / (bw["all_cores"] * 1e9) if bw else float("nan")
  timed = len(reports) * args.repeats
  result = {
      "model": args.model, "batch_size": bs, "steps": args.steps, "repeats": args.repeats,
      "code": os.path.dirname(ginn.__file__), "floor_ms": floor_ms, "bandwidth_gb_per_s": bw,
      "variants": {v: {"trusted_ms": 1e3 * statistics.median(times[v]),
                       "vs_floor": 1e3 * statistics.median(times[v]) / floor_ms,
                       "phase_ms": {k: 1e3 * x / timed for k, x in sorted(phases[v].items())}}
                   for v in variants},
      "load_average_1m": os.getloadavg()[0],
  }
  for v, r in result["variants"].items():
    print(f"{args.model} {v:>11}: {r['trusted_ms']:7.2f} ms/step = {r['vs_floor']:.2f}x floor "
          f"({floor_ms:.2f} ms)  " + " ".join(f"{k} {x:.2f}" for k, x in r["phase_ms"].items()))
  if args.out:
    path = os.path.join(args.out, f"ceiling_levers_{args.model}_cpu.json")
    with open(path, "w") as f:
      json.dump(result, f, indent=2, sort_keys=True)
    print(f"results written to {path}")
  return 0


def _switches(rt):
  """Sets one lever back to what it replaced (a benchmark only: private hooks)."""
  from ginn_jax._src.trusted import commit
  from ginn_jax._src.trusted import runtime as runtime_mod

  overlapped = runtime_mod.checked_update
  threaded = commit.THREADED_BYTES

  def serial(tx, state, grads):
    out = overlapped(tx, state, grads)
    jax.block_until_ready(out)  # The update finishes before the hash starts.
    return out

  def switch(v: str) -> None:
    if v not in (*VARIANTS, "baseline"):
      raise SystemExit(f"unknown variant {v!r}; choose from {VARIANTS} or 'baseline'")
    runtime_mod.checked_update = serial if v == "serial" else overlapped
    commit.THREADED_BYTES = sys.maxsize if v == "one_thread" else threaded
    rt.report_digest_name = "sha256" if v == "sha256" else commit.DEFAULT_DIGEST

  return switch


if __name__ == "__main__":
  sys.exit(main())
