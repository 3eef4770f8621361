"""Many hosts: a worker spanning 2 processes of `jax.distributed` on localhost,
each with 2 CPU devices, over JAX's CPU collectives (gloo).

Each case starts real processes (tests/multihost_child.py) and kills them
after a deadline, so a hang fails the test instead of hanging the suite.
"""
import hashlib
import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import ginn_jax as ginn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(ginn.__file__)))
CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_child.py")
DEADLINE_S = 240  # Whole launch; a healthy one takes 10-30 s on 2 cores.
STEPS = 3
SHARDS = 4  # 2 per process: its worker device (the second of 2) computes 2.


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(num_devices: int) -> dict[str, str]:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
  env["PYTHONPATH"] = os.pathsep.join([ROOT, *filter(None, [env.get("PYTHONPATH")])])
  env["JAX_PLATFORMS"] = "cpu"
  env["TQDM_DISABLE"] = "1"
  return env


class Launch:
  """`num_processes` processes started at once (a jax.distributed run when
  > 1): the child script, or `command` (e.g. ``ginn train``)."""

  def __init__(self, tmp_path, name: str, args: list[str], *, num_processes: int, devices: int,
               command: list[str] | None = None):
    port = _free_port()
    self.procs, self.outs, self.logs = [], [], []
    for i in range(num_processes):
      out = tmp_path / f"{name}-{i}.json"
      dist = ([] if num_processes == 1 else
              ["--coordinator-address", f"localhost:{port}", "--num-processes",
               str(num_processes), "--process-id", str(i)])
      argv = [*(command or [sys.executable, CHILD, str(out)]), *args, *dist]
      stdout, stderr = (open(tmp_path / f"{name}-{i}.{ext}", "w+") for ext in ("out", "err"))
      self.procs.append(subprocess.Popen(argv, env=_env(devices), stdout=stdout, stderr=stderr))
      self.outs.append(out)
      self.logs.append((stdout, stderr))

  def results(self, deadline: float) -> list[dict]:
    """Waits for every process until `deadline` (time.monotonic()), kills any
    left, and returns each one's exit code, stdout, stderr and written JSON."""
    try:
      for proc in self.procs:
        try:
          proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
          pass
    finally:
      for proc in self.procs:
        if proc.poll() is None:  # Past the deadline: ours to kill.
          proc.kill()
          proc.wait()
    results = []
    for proc, out, (stdout, stderr) in zip(self.procs, self.outs, self.logs):
      stdout.seek(0)
      stderr.seek(0)
      results.append({"returncode": proc.returncode, "stdout": stdout.read(),
                      "stderr": "".join(line for line in stderr if "[Gloo]" not in line),
                      "json": json.loads(out.read_text()) if out.exists() else None})
      stdout.close()
      stderr.close()
    return results


@pytest.fixture(scope="module")
def data_file(small_data, tmp_path_factory):
  path = tmp_path_factory.mktemp("multihost") / "data.npz"
  images, labels = small_data
  np.savez(path, images=images[:256], labels=labels[:256])
  return path


CHILD_ARGS = ["--steps", str(STEPS), "--num-shards", str(SHARDS)]
CLEAN_ARGS = [*CHILD_ARGS, "--p-witness", "1"]  # Every shard re-computed and witness-checked.


@pytest.fixture(scope="module")
def runs(data_file, tmp_path_factory):
  """Every multi-process run of this file, started at once (they share the
  2 cores; each alone takes 10-30 s), then waited for."""
  tmp = tmp_path_factory.mktemp("runs")
  data = str(data_file)
  launches = {
      "clean": Launch(tmp, "clean", [data, *CLEAN_ARGS], num_processes=2, devices=2),
      # Shards 2 and 3 are computed on process 1's device.
      "attack": Launch(tmp, "attack", [data, *CHILD_ARGS, "--attack-shard", "2"],
                       num_processes=2, devices=2),
      # Process 1 dies (os._exit) when step 1's order arrives.
      "dead": Launch(tmp, "dead", [data, *CHILD_ARGS, "--die-at-step", "1"],
                     num_processes=2, devices=2),
      # The command, as a user starts it on two hosts.
      "cli": Launch(tmp, "cli", ["train", "--dataset", "digits", "--model", "mlp",
                                 "--steps", str(STEPS),
                                 "--batch-size", "32", "--num-shards", str(SHARDS), "--p", "1",
                                 "--tolerance", '{"rel_l2": 1e-5, "max_abs": 1e-5}',
                                 "--no-progress"],
                    num_processes=2, devices=2, command=[sys.executable, "-m", "ginn_jax"]),
  }
  deadline = time.monotonic() + DEADLINE_S
  results = {name: launch.results(deadline) for name, launch in launches.items()}
  assert time.monotonic() < deadline, "a multi-process run hung until it was killed"
  return results


def _failure(results) -> str:
  return "\n".join(f"--- process {i}: exit {r['returncode']}\n{r['stderr'][-3000:]}"
                   for i, r in enumerate(results))


def _sha256(tree) -> list[str]:
  return [hashlib.sha256(np.asarray(x).tobytes()).hexdigest()
          for x in jax.tree_util.tree_leaves(jax.device_get(tree))]


@pytest.fixture(scope="module")
def single_process_run(mlp, small_data):
  """The reference: a plain run in this process (2 CPU devices: the 4 shards
  on its one worker device, `cpu:1`), no `MultiHostWorker`."""
  images, labels = small_data[0][:256], small_data[1][:256]
  cfg = ginn.ProtocolConfig(seed=0, batch_size=32, p=1.0, p_witness=1.0, num_shards=SHARDS)
  rt = ginn.TrustedRuntime(mlp, images, labels, cfg, audit_secret=b"\1" * 32)
  res = ginn.train(rt, ginn.ShardedWorker(mlp, images, labels, num_shards=SHARDS), STEPS,
                   progress=False)
  return {"params": _sha256(res.params), "digests": [e.digest for e in res.transcript],
          "witness_digests": [e.witness_digest for e in res.transcript]}


@pytest.mark.slow
def test_two_processes_equal_one_process_bitwise(runs, single_process_run):
  single = {"json": single_process_run}
  results = runs["clean"]
  assert [r["returncode"] for r in results] == [0, 0], _failure(results)
  lead, follower = (r["json"] for r in results)
  assert lead["local_devices"] != follower["local_devices"]
  assert lead["summary"]["verified"] is True
  assert lead["summary"]["steps"] == STEPS and lead["summary"]["num_verified"] == STEPS
  assert follower["follow"] == {"command": "STOP", "steps": STEPS}
  # Every report (its digest covers every shard's bytes) and the final model,
  # bit for bit.
  assert lead["digests"] == single["json"]["digests"]
  assert lead["params"] == single["json"]["params"]
  # Every shard's witness (computed on process 0) was checked, bitwise the
  # single-process witnesses too.
  assert lead["witness_shards"] == [list(range(SHARDS))] * STEPS
  assert lead["witness_digests"] == single["json"]["witness_digests"]


@pytest.mark.slow
def test_a_malicious_shard_on_process_1_is_caught(runs):
  results = runs["attack"]
  assert [r["returncode"] for r in results] == [3, 3], _failure(results)
  lead, follower = (r["json"] for r in results)
  assert lead["violation"]["step"] == 0 and lead["violation"]["shard"] == 2
  assert lead["summary"]["verified"] is False and lead["summary"]["steps"] == 0
  assert follower["follow"] == {"command": "HALT", "steps": 1}


@pytest.mark.slow
def test_a_dead_follower_is_an_error_not_a_hang(runs):
  lead, follower = runs["dead"]
  assert follower["returncode"] == 9
  # Process 0's gather of step 1 fails as soon as the peer's connection closes;
  # then jax.distributed's shutdown (the peer missing) ends it with an abort.
  assert lead["returncode"] not in (0, None), _failure(runs["dead"])
  assert "Gloo" in lead["json"]["error"] and lead["json"]["exit_code"] == 4
  assert "summary" not in lead["json"]


@pytest.mark.slow
def test_ginn_train_on_two_processes(runs):
  lead, follower = runs["cli"]
  assert [lead["returncode"], follower["returncode"]] == [0, 0], _failure(runs["cli"])
  summary = json.loads(lead["stdout"])  # Only the JSON: gloo's chatter goes to stderr.
  assert summary["verified"] is True and summary["steps"] == STEPS
  assert summary["num_verified"] == STEPS and summary["num_violations"] == 0
  assert summary["num_shards"] == SHARDS and summary["num_processes"] == 2
  assert follower["stdout"] == ""


# -- one process: the same objects, without the collectives' peers ------------

def test_the_multihost_worker_does_not_import_the_trusted_side():
  import ast
  import pathlib

  tree = ast.parse((pathlib.Path(ginn.__file__).parent / "_src" / "worker" / "multihost.py")
                   .read_text())
  imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
  assert imported and not [m for m in imported if m and "trusted" in m], imported


def test_the_worker_mesh_leaves_the_trusted_device_out():
  mesh = ginn.global_worker_mesh()
  assert list(mesh.devices.flat) == ginn.worker_devices()
  assert ginn.trusted_device() not in list(mesh.devices.flat)


@pytest.fixture(scope="module")
def multihost_worker(mlp, small_data):
  images, labels = small_data
  inner = ginn.ShardedWorker(mlp, images, labels, num_shards=SHARDS, mesh=ginn.global_worker_mesh())
  return inner, ginn.MultiHostWorker(inner, batch_size=32)


def test_in_one_process_it_is_its_inner_worker_bitwise(mlp, small_data, multihost_worker):
  from conftest import tree_bytes

  images, labels = small_data
  inner, worker = multihost_worker
  rt = ginn.TrustedRuntime(mlp, images, labels, ginn.ProtocolConfig(batch_size=32))
  order = rt.next_order()
  got, want = worker(order), inner(order)
  assert isinstance(got.grads["Dense_0"]["kernel"], np.ndarray)  # Gathered to the host.
  assert got.step == want.step == 0
  assert tree_bytes(got.grads) == tree_bytes(want.grads)
  assert tree_bytes(got.loss) == tree_bytes(want.loss)


def test_witness_requests_are_answered_on_process_0(mlp, small_data, multihost_worker):
  from conftest import tree_bytes

  images, labels = small_data
  inner, worker = multihost_worker
  rt = ginn.TrustedRuntime(mlp, images, labels,
                           ginn.ProtocolConfig(batch_size=32, num_shards=SHARDS))
  request = ginn.WitnessRequest(step=0, order=rt.next_order(), shard=3)
  got, want = worker.witness(request), inner.witness(request)
  assert tree_bytes((got.outputs, got.input_grads)) == tree_bytes((want.outputs, want.input_grads))


def test_process_0_does_not_follow(multihost_worker):
  _, worker = multihost_worker
  with pytest.raises(RuntimeError, match="process 0 hosts the trusted runtime"):
    ginn.follow(worker)
