"""Many hosts: a worker spanning 2 processes of `jax.distributed` on localhost,
each with 2 CPU devices, over JAX's CPU collectives (gloo).

Each case starts real processes (tests/multihost_child.py) and kills them
after a deadline, so a hang fails the test instead of hanging the suite.
"""
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import ginn_jax as ginn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(ginn.__file__)))
CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_child.py")
DEADLINE_S = 240  # Whole launch; a healthy one takes 10-30 s on 2 cores.
STEPS = 3
SHARDS = 4  # 2 processes x 2 devices.


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


def launch(tmp_path, name: str, args: list[str], *, num_processes: int, devices: int,
           command: list[str] | None = None) -> list[dict]:
  """Starts `num_processes` processes (a jax.distributed run when > 1), waits
  for all of them until `DEADLINE_S`, then kills any left. Returns, for each,
  its exit code, output and (child script) the JSON it wrote."""
  port = _free_port()
  procs, outs = [], []
  for i in range(num_processes):
    out = tmp_path / f"{name}-{i}.json"
    dist = ([] if num_processes == 1 else
            ["--coordinator-address", f"localhost:{port}", "--num-processes", str(num_processes),
             "--process-id", str(i)])
    argv = [*(command or [sys.executable, CHILD, str(out)]), *args, *dist]
    log = open(tmp_path / f"{name}-{i}.log", "w+")
    procs.append((subprocess.Popen(argv, env=_env(devices), stdout=subprocess.PIPE, stderr=log,
                                   text=True), log))
    outs.append(out)
  deadline = time.monotonic() + DEADLINE_S
  results = []
  try:
    for (proc, log), out in zip(procs, outs):
      try:
        stdout, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        stdout = ""
      results.append({"returncode": proc.returncode, "stdout": stdout, "log": log,
                      "json": json.loads(out.read_text()) if out.exists() else None})
  finally:
    for proc, _ in procs:
      if proc.poll() is None:  # Past the deadline: ours to kill.
        proc.kill()
        proc.wait()
  for r in results:
    r["log"].seek(0)
    r["stderr"] = "".join(line for line in r["log"] if "[Gloo]" not in line)
    r["log"].close()
  return results


@pytest.fixture(scope="module")
def data_file(small_data, tmp_path_factory):
  path = tmp_path_factory.mktemp("multihost") / "data.npz"
  images, labels = small_data
  np.savez(path, images=images[:256], labels=labels[:256])
  return path


@pytest.fixture(scope="module")
def single_process_run(data_file, tmp_path_factory):
  """The reference: one process whose mesh has the same S = 4 devices."""
  (r,) = launch(tmp_path_factory.mktemp("single"), "single",
                [str(data_file), "--steps", str(STEPS), "--num-shards", str(SHARDS)],
                num_processes=1, devices=SHARDS)
  assert r["returncode"] == 0, r["stderr"][-3000:]
  return r["json"]


def _failure(results) -> str:
  return "\n".join(f"--- process {i}: exit {r['returncode']}\n{r['stderr'][-3000:]}"
                   for i, r in enumerate(results))


@pytest.mark.slow
def test_two_processes_equal_one_process_bitwise(data_file, single_process_run, tmp_path):
  results = launch(tmp_path, "clean",
                   [str(data_file), "--steps", str(STEPS), "--num-shards", str(SHARDS)],
                   num_processes=2, devices=2)
  assert [r["returncode"] for r in results] == [0, 0], _failure(results)
  lead, follower = (r["json"] for r in results)
  assert lead["local_devices"] != follower["local_devices"]
  assert lead["summary"]["verified"] is True
  assert lead["summary"]["steps"] == STEPS and lead["summary"]["num_verified"] == STEPS
  assert follower["follow"] == {"command": "STOP", "steps": STEPS}
  # Every report (its digest covers every shard's bytes) and the final model,
  # bit for bit.
  assert lead["digests"] == single_process_run["digests"]
  assert lead["params"] == single_process_run["params"]


@pytest.mark.slow
def test_a_malicious_shard_on_process_1_is_caught(data_file, tmp_path):
  attacked = 2  # Shards 2 and 3 are computed on process 1's devices.
  results = launch(tmp_path, "attack",
                   [str(data_file), "--steps", str(STEPS), "--num-shards", str(SHARDS),
                    "--attack-shard", str(attacked)],
                   num_processes=2, devices=2)
  assert [r["returncode"] for r in results] == [3, 3], _failure(results)
  lead, follower = (r["json"] for r in results)
  assert lead["violation"]["step"] == 0
  assert lead["summary"]["verified"] is False and lead["summary"]["steps"] == 0
  assert follower["follow"] == {"command": "HALT", "steps": 1}
