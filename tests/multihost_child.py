"""One process of the multi-host test (tests/test_multihost.py starts it).

    python tests/multihost_child.py OUT.json DATA.npz --steps N --num-shards S
        [--coordinator-address HOST:PORT --num-processes P --process-id I]
        [--attack-shard K] [--shard-mode MODE] [--die-at-step T] [--lead-raise-at-step T --linger S]
        [--lead-die-at-step T] [--batch-size B]

Without a coordinator it is one process (a `MultiHostWorker` of one process);
with one, it is process I of P. Every process writes what
it saw to OUT.json; process 0 exits 3 when the run halted on an integrity
violation, followers exit 0 on STOP and 3 on HALT; any other error is
recorded and raised. With --lead-raise-at-step, process 0 raises inside step
T's computation, records when, and then stays up for --linger seconds, as a
notebook's kernel would, before it exits 6.
"""
import argparse
import hashlib
import json
import os
import sys
import time


def main() -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument("out")
  parser.add_argument("data")
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--num-shards", type=int, default=4)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--p", type=float, default=1.0)
  parser.add_argument("--p-witness", type=float, default=0.0)
  parser.add_argument("--coordinator-address", default=None)
  parser.add_argument("--num-processes", type=int, default=1)
  parser.add_argument("--process-id", type=int, default=0)
  parser.add_argument("--attack-shard", type=int, default=None,
                      help="corrupt this shard of every report, on the process that computes it")
  parser.add_argument("--shard-mode", default="per_shard", choices=["per_shard", "aggregate"])
  parser.add_argument("--die-at-step", type=int, default=None,
                      help="a follower that dies (os._exit) when this step's order arrives")
  parser.add_argument("--lead-raise-at-step", type=int, default=None,
                      help="process 0 raises inside this step (then lingers)")
  parser.add_argument("--lead-die-at-step", type=int, default=None,
                      help="process 0 dies (os._exit) inside this step")
  parser.add_argument("--linger", type=float, default=0.0,
                      help="seconds process 0 stays up after --lead-raise-at-step's error")
  args = parser.parse_args()

  import jax
  import numpy as np

  import ginn_jax as ginn

  if args.coordinator_address:
    ginn.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id,
                                timeout_s=60, heartbeat_timeout_s=20)
  # The hardening of tests/conftest.py.
  jax.config.update("jax_numpy_dtype_promotion", "strict")
  jax.config.update("jax_debug_key_reuse", True)
  jax.config.update("jax_transfer_guard", "disallow")

  with np.load(args.data) as f:
    images, labels = f["images"], f["labels"]
  model = ginn.get_model("mlp", input_shape=(28, 28, 1))
  if args.coordinator_address:  # Every process, before the first order.
    ginn.check_agreement(model, ginn.Batch(images, labels), ginn.ProtocolConfig(
        seed=0, batch_size=args.batch_size, p=args.p, p_witness=args.p_witness,
        num_shards=args.num_shards, shard_mode=args.shard_mode))
  mesh = ginn.global_worker_mesh()
  inner = ginn.ShardedWorker(model, images, labels, num_shards=args.num_shards, mesh=mesh,
                             shard_mode=args.shard_mode)
  if args.attack_shard is not None:
    inner = TamperLocalShard(inner, args.attack_shard)
  if args.die_at_step is not None and jax.process_index() > 0:
    inner = DieAt(inner, args.die_at_step)
  if args.lead_die_at_step is not None and jax.process_index() == 0:
    inner = DieAt(inner, args.lead_die_at_step)
  if args.lead_raise_at_step is not None and jax.process_index() == 0:
    inner = RaiseAt(inner, args.lead_raise_at_step)
  worker = ginn.MultiHostWorker(inner, batch_size=args.batch_size)
  out = {"process_index": jax.process_index(), "process_count": jax.process_count(),
         "local_devices": [str(d) for d in jax.local_devices()]}
  code = 0
  try:
    if args.lead_raise_at_step is not None and jax.process_index() == 0:
      return lead_raises(args, ginn, model, images, labels, worker, out)
    if jax.process_index() == 0:
      cfg = ginn.ProtocolConfig(seed=0, batch_size=args.batch_size, p=args.p,
                                p_witness=args.p_witness, num_shards=args.num_shards,
                                shard_mode=args.shard_mode)
      rt = ginn.TrustedRuntime(model, images, labels, cfg, audit_secret=b"\1" * 32)
      try:
        res = ginn.train_multihost(rt, worker, args.steps, progress=False)
      except ginn.IntegrityViolation as e:
        res = e.result
        out["violation"] = {"step": e.step, "shard": e.shard, "leaf": e.leaf, "message": str(e)}
        code = 3
      out["summary"] = res.summary()
      out["params"] = [hashlib.sha256(np.asarray(x).tobytes()).hexdigest()
                       for x in jax.tree_util.tree_leaves(jax.device_get(res.params))]
      out["digests"] = [e.digest for e in res.transcript]
      out["witness_digests"] = [e.witness_digest for e in res.transcript]
      out["witness_shards"] = [e.witness_shards for e in res.transcript]
      out["projections_digests"] = [e.projections_digest for e in res.transcript]
    else:
      result = ginn.follow(worker)
      out["follow"] = {"command": result.command.name, "steps": result.steps}
      code = 3 if result.halted else 0
  except Exception as e:  # Recorded, then raised (a dead peer's error, say).
    out["error"] = f"{type(e).__name__}: {e}"[:2000]
    code = 4
    raise
  finally:
    out["exit_code"] = code
    with open(args.out, "w") as f:
      json.dump(out, f)
    if args.coordinator_address:
      ginn.shutdown_distributed()
  return code


def lead_raises(args, ginn, model, images, labels, worker, out) -> int:
  """Process 0 of a run whose worker raises inside a step: records the error
  and when, then lingers (a notebook's kernel stays up after an error)."""
  cfg = ginn.ProtocolConfig(seed=0, batch_size=args.batch_size, p=args.p,
                            p_witness=args.p_witness, num_shards=args.num_shards,
                            shard_mode=args.shard_mode)
  rt = ginn.TrustedRuntime(model, images, labels, cfg, audit_secret=b"\1" * 32)
  try:
    ginn.train_multihost(rt, worker, args.steps, progress=False)
  except RuntimeError as e:
    out["error"] = f"{type(e).__name__}: {e}"
    out["raised_at"] = time.time()
  out["exit_code"] = 6
  with open(args.out, "w") as f:
    json.dump(out, f)
  time.sleep(args.linger)
  os._exit(6)  # No shutdown: a notebook would not call it either.


class RaiseAt:
  """A worker that raises when step `t`'s order arrives (on process 0: inside
  the step, after the broadcast; the followers compute it and wait)."""

  def __init__(self, inner, t: int):
    self.inner, self.model, self.mesh, self.t = inner, inner.model, inner.mesh, t

  def __call__(self, order):
    if order.step == self.t:
      raise RuntimeError(f"the worker of process 0 failed at step {order.step}")
    return self.inner(order)


class TamperLocalShard:
  """A compromised process: adds 1e-2 to every gradient entry of shard `k` if
  one of its devices computes it (every other shard stays honest). In
  aggregate mode it does so before the mean over the mesh, and answers the
  projection challenge with the tampered shard's gradient (consistently)."""

  def __init__(self, inner, k: int):
    self.inner, self.model, self.mesh, self.k = inner, inner.model, inner.mesh, k
    if inner.aggregate:
      self.project = inner.project

  def __call__(self, order):
    import dataclasses

    import jax

    if self.inner.aggregate:
      loss, grads = self.inner.compute(order.params, order.batch_indices, order.layer_key)
      return self.inner.aggregate_report(order.step, loss, jax.tree_util.tree_map(self._tamper, grads))
    report = self.inner(order)
    return dataclasses.replace(report, grads=jax.tree_util.tree_map(self._tamper, report.grads))

  def _tamper(self, leaf):
    import jax
    import numpy as np

    shards = []
    for s in leaf.addressable_shards:  # This process's devices' blocks of shards.
      data, rows = s.data, s.index[0]
      if rows.start <= self.k < rows.stop:
        host = np.array(data)
        host[self.k - rows.start] += np.float32(1e-2)
        data = jax.device_put(host, s.device)
      shards.append(data)
    return jax.make_array_from_single_device_arrays(leaf.shape, leaf.sharding, shards)


class DieAt:
  """A process that dies without a word when step `t`'s order arrives."""

  def __init__(self, inner, t: int):
    self.inner, self.model, self.mesh, self.t = inner, inner.model, inner.mesh, t

  def __call__(self, order):
    if order.step == self.t:
      os._exit(9)
    return self.inner(order)


if __name__ == "__main__":
  os.environ.setdefault("TQDM_DISABLE", "1")
  sys.exit(main())
