"""Many hosts: a worker spanning 2 processes of `jax.distributed` on localhost,
each with 2 CPU devices, over JAX's CPU collectives (gloo).

The runs: a clean one (bitwise the single-process run), a malicious shard on
process 1, a follower that dies, process 0 raising inside a step and staying
up (as a notebook) or dying there, `ginn train` on two processes, two
processes started with different settings, and `ginn train --run-dir` over
two processes, uninterrupted and killed (SIGKILL, every process) at a random
step and started again.

Each case starts real processes (tests/multihost_child.py) and kills a run
that hangs, so a hang fails the test instead of hanging the suite: a run hangs
when none of its live processes used any CPU time for `HANG_S` (on a busy
machine a healthy run is slow, not idle), or after `LIMIT_S` in all.

Ports: each run's coordinator port stays reserved by this process from the
moment it is chosen until the run is over (`_PortReservation`). Choosing a
free port and closing it again ("bind to port 0, close, hand the number over")
leaves it free for anyone until the coordinator binds it seconds later, and
the coordinator (gRPC) binds with SO_REUSEPORT: if another run's coordinator
took the same number meanwhile (a concurrent run of this file, the same
machine's other test session), both bind without an error, and the processes
of both runs register with the wrong one and abort (tried: every process of
two 2-process runs on one port aborts in registration). Processes: every child
is started in a session of its own and killed with its group whatever happens
to the test process (an error while starting the others, an interrupt, exit).
"""
import atexit
import hashlib
import json
import os
import random
import signal
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
HANG_S = 120  # No CPU time used by any live process of a run this long: it hangs.
LIMIT_S = 900  # Every run, at most (the file takes 2-2.5 min on 2 busy cores).
WALL_S = 240  # Where a process's CPU time cannot be read: every run, at most.
STEPS = 3
RESUME_STEPS = 10  # Steps of the runs persisted to a run directory.
LINGER_S = 90  # How long process 0 stays up after its error inside a step ("a notebook").
SHARDS = 4  # 2 per process: its worker device (the second of 2) computes 2.


class _PortReservation:
  """A free localhost port, held until `close`: a bound (not listening) socket
  with SO_REUSEPORT, so that the run's coordinator, which binds with
  SO_REUSEPORT too (gRPC's default), can listen on it, while the kernel hands
  it to no one else (no bind to port 0 and no outgoing connection gets a port
  that a socket holds). Two reservations are never the same port."""

  def __init__(self):
    self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if hasattr(socket, "SO_REUSEPORT"):
      self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    self._sock.bind(("127.0.0.1", 0))
    self.port = self._sock.getsockname()[1]

  def close(self) -> None:
    self._sock.close()


_LIVE: list[subprocess.Popen] = []  # Every child not yet reaped, for `_kill_all`.


def _kill(proc: subprocess.Popen) -> None:
  """Kills `proc` and anything it started (its own process group), then reaps it."""
  if proc.poll() is None:
    try:
      os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
  proc.wait()
  if proc in _LIVE:
    _LIVE.remove(proc)


@atexit.register
def _kill_all() -> None:
  """No child outlives the test process (an interrupted run, an error between launches)."""
  for proc in list(_LIVE):
    _kill(proc)


def _env(num_devices: int) -> dict[str, str]:
  """The test process's environment for a child with `num_devices` CPU devices:
  the same XLA flags otherwise (the reference run in this process computes
  under them), JAX on the CPU, this checkout first on the path."""
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
  env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={num_devices}"])
  env["PYTHONPATH"] = os.pathsep.join([ROOT, *filter(None, [env.get("PYTHONPATH")])])
  env["JAX_PLATFORMS"] = "cpu"
  env["TQDM_DISABLE"] = "1"
  return env


class Launch:
  """`num_processes` processes started at once (a jax.distributed run when
  > 1): the child script, or `command` (e.g. ``ginn train``)."""

  def __init__(self, tmp_path, name: str, args: list[str], *, num_processes: int, devices: int,
               command: list[str] | None = None, extra: dict[int, list[str]] | None = None,
               watch=None):
    self.port = _PortReservation()  # Held until the run is over (module docstring).
    self.procs, self.outs, self.logs = [], [], []
    self.exited_at: dict[int, float] = {}  # pid: when `_wait` first saw it gone (time.time()).
    self.watch = watch  # A callable: True when `_wait` should kill the run (not a hang).
    self.killed_by_watch = False
    for i in range(num_processes):
      out = tmp_path / f"{name}-{i}.json"
      dist = ([] if num_processes == 1 else
              ["--coordinator-address", f"127.0.0.1:{self.port.port}", "--num-processes",
               str(num_processes), "--process-id", str(i)])
      argv = [*(command or [sys.executable, CHILD, str(out)]), *args, *(extra or {}).get(i, []),
              *dist]
      stdout, stderr = (open(tmp_path / f"{name}-{i}.{ext}", "w+") for ext in ("out", "err"))
      self.outs.append(out)
      self.logs.append((stdout, stderr))
      try:
        proc = subprocess.Popen(argv, env=_env(devices), stdout=stdout, stderr=stderr,
                                start_new_session=True)
      except BaseException:
        self.kill()  # The processes of this run that did start.
        raise
      self.procs.append(proc)
      _LIVE.append(proc)

  def kill(self) -> None:
    """Kills every process of the run still alive and frees its port."""
    for proc in self.procs:
      _kill(proc)
    self.port.close()

  def results(self) -> list[dict]:
    """Each process's exit code, stdout, stderr and written JSON (after `_wait`)."""
    self.kill()  # Reaps them all (and kills none: they have exited).
    results = []
    for proc, out, (stdout, stderr) in zip(self.procs, self.outs, self.logs):
      stdout.seek(0)
      stderr.seek(0)
      results.append({"returncode": proc.returncode, "stdout": stdout.read(),
                      "exited_at": self.exited_at.get(proc.pid),
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
AGGREGATE = ["--shard-mode", "aggregate"]  # (The child's default is per_shard.)


@pytest.fixture(scope="module")
def runs(data_file, tmp_path_factory):
  """Every multi-process run of this file, started at once (they share the
  2 cores; each alone takes 10-30 s), then waited for."""
  tmp = tmp_path_factory.mktemp("runs")
  data = str(data_file)
  launches: dict[str, Launch] = {}
  try:
    yield _launch_all(tmp, data, launches)
  finally:  # Whatever failed (a launch that did not start, an interrupt): no child is left.
    for launch in launches.values():
      launch.kill()


def _launch_all(tmp, data: str, launches: dict) -> dict[str, list[dict]]:
  """Starts the runs one by one into `launches` (so the fixture kills what
  started if a later one fails to), then waits for all of them; then starts
  the killed run again (the same command) and waits for it."""
  cli = ["train", "--dataset", "digits", "--model", "mlp", "--steps", str(STEPS), "--batch-size", "32",
         "--num-shards", str(SHARDS), "--p", "1", "--tolerance", '{"rel_l2": 1e-5, "max_abs": 1e-5}',
         "--no-progress"]
  secret = tmp / "audit.secret"  # One secret for both persisted runs: the same coins.
  secret.write_text("07" * 32)
  persisted = [*cli, "--steps", str(RESUME_STEPS), "--p", "0.5", "--checkpoint-every", "2",
               "--audit-secret-file", str(secret)]
  kill_at = random.SystemRandom().randint(1, RESUME_STEPS - 4)
  print(f"the persisted run is killed once its transcript has step {kill_at}")
  specs = {
      "clean": ([data, *CLEAN_ARGS], None, {}),
      # Shards 2 and 3 are computed on process 1's device.
      "attack": ([data, *CHILD_ARGS, "--attack-shard", "2"], None, {}),
      # Process 1 dies (os._exit) when step 1's order arrives.
      "dead": ([data, *CHILD_ARGS, "--die-at-step", "1"], None, {}),
      # Process 0 raises inside step 1, then stays up (as a notebook).
      "lead_raises": ([data, *CHILD_ARGS, "--lead-raise-at-step", "1", "--linger", str(LINGER_S)],
                      None, {}),
      # Process 0 dies (os._exit) inside step 1.
      "lead_dies": ([data, *CHILD_ARGS, "--lead-die-at-step", "1"], None, {}),
      # Aggregate mode: the mean over both processes' devices, the projection challenge
      # broadcast and its scalars gathered; then a tampered shard on process 1.
      "agg_clean": ([data, *CLEAN_ARGS, *AGGREGATE], None, {}),
      "agg_attack": ([data, *CHILD_ARGS, "--attack-shard", "2", *AGGREGATE], None, {}),
      # The command, as a user starts it on two hosts (the default shard mode: aggregate).
      "cli": (cli, [sys.executable, "-m", "ginn_jax"], {}),
      # Process 1 started with another batch size and dataset.
      "disagree": (cli, [sys.executable, "-m", "ginn_jax"],
                   {1: ["--batch-size", "64", "--dataset", "mnist5k"]}),
      # Persisted to a run directory: uninterrupted, and killed at step `kill_at`.
      "persisted": ([*persisted, "--run-dir", str(tmp / "persisted")],
                    [sys.executable, "-m", "ginn_jax"], {}),
      "killed": ([*persisted, "--run-dir", str(tmp / "killed")], [sys.executable, "-m", "ginn_jax"],
                 {}),
  }
  for name, (args, command, extra) in specs.items():
    watch = (lambda: _has_step(tmp / "killed" / "transcript.jsonl", kill_at)) if name == "killed" else None
    launches[name] = Launch(tmp, name, args, num_processes=2, devices=2, command=command,
                            extra=extra, watch=watch)
  hung = _wait(launches)
  assert not hung, f"multi-process runs hung and were killed: {hung}"
  assert launches["killed"].killed_by_watch, f"the run to kill ended before step {kill_at}"
  killed_records = _records(tmp / "killed" / "transcript.jsonl")
  # The same command again, on every process.
  launches["resumed"] = Launch(tmp, "resumed", specs["killed"][0], num_processes=2, devices=2,
                               command=specs["killed"][1])
  hung = _wait({"resumed": launches["resumed"]})
  results = {name: launch.results() for name, launch in launches.items()}
  assert not hung, f"multi-process runs hung and were killed: {hung}"
  results["killed_records"] = killed_records
  results["kill_at"] = kill_at
  results["run_dirs"] = {name: tmp / name for name in ("persisted", "killed")}
  return results


def _records(path) -> list[dict]:
  """The transcript's records that are whole lines (a kill may tear the last)."""
  records = []
  with open(path) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except ValueError:
        break
  return records


def _has_step(path, step: int) -> bool:
  """Whether the transcript at `path` records step `step` (read while written)."""
  try:
    return any(r["type"] == "step" and r["body"]["step"] >= step for r in _records(path))
  except (OSError, KeyError):
    return False


def _cpu_seconds(pid: int) -> float | None:
  """User + system CPU time of a live process (Linux /proc), None where unknown."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
  except (OSError, IndexError, ValueError):
    return None


def _wait(launches: dict[str, Launch]) -> list[str]:
  """Waits until every process has exited; kills a run that hangs (module
  docstring; without /proc, any run still alive after `WALL_S`).
  Returns the names of the runs it killed."""
  start = time.monotonic()
  last_progress = dict.fromkeys(launches, start)  # When a process of each run last used CPU.
  cpu_seen: dict[int, float] = {}  # Each process's CPU time when last read.
  hung: list[str] = []
  while True:
    now, waiting = time.monotonic(), False
    for name, launch in launches.items():
      for proc in launch.procs:
        if proc.poll() is not None:
          launch.exited_at.setdefault(proc.pid, time.time())
      alive = [proc for proc in launch.procs if proc.poll() is None]
      if not alive or name in hung:
        continue
      if launch.watch is not None and launch.watch():
        launch.kill()  # Every process at once, as a machine that loses power.
        launch.killed_by_watch, launch.watch = True, None
        continue
      waiting = True
      cpu = {proc.pid: _cpu_seconds(proc.pid) for proc in alive}
      if None in cpu.values():  # No /proc: a wall-clock deadline only.
        stale = now - start > WALL_S
      else:
        if any(t > cpu_seen.get(pid, -1.0) for pid, t in cpu.items()):
          last_progress[name] = now
        cpu_seen.update(cpu)
        stale = now - last_progress[name] > HANG_S
      if stale or now - start > LIMIT_S:
        launch.kill()
        hung.append(name)
    if not waiting:
      return hung
    time.sleep(0.02 if any(launch.watch for launch in launches.values()) else 0.25)


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
  cfg = ginn.ProtocolConfig(seed=0, batch_size=32, p=1.0, p_witness=1.0, num_shards=SHARDS,
                            shard_mode="per_shard")
  rt = ginn.TrustedRuntime(mlp, images, labels, cfg, audit_secret=b"\1" * 32)
  res = ginn.train(rt, ginn.ShardedWorker(mlp, images, labels, num_shards=SHARDS, shard_mode="per_shard"),
                   STEPS, progress=False)
  return {"params": _sha256(res.params), "digests": [e.digest for e in res.transcript],
          "witness_digests": [e.witness_digest for e in res.transcript]}


@pytest.fixture(scope="module")
def aggregate_single_process_run(mlp, small_data):
  """The aggregate reference: this process's two CPU devices as the mesh, two
  shards each, as the two processes hold them: the mean over the mesh adds
  the same two partial sums (a sum of two is the same in either order)."""
  from jax.sharding import Mesh

  images, labels = small_data[0][:256], small_data[1][:256]
  cfg = ginn.ProtocolConfig(seed=0, batch_size=32, p=1.0, p_witness=1.0, num_shards=SHARDS,
                            shard_mode="aggregate")
  rt = ginn.TrustedRuntime(mlp, images, labels, cfg, audit_secret=b"\1" * 32)
  mesh = Mesh(np.array(jax.devices("cpu")[:2]), ("shards",))
  res = ginn.train(rt, ginn.ShardedWorker(mlp, images, labels, num_shards=SHARDS, mesh=mesh,
                                          shard_mode="aggregate"), STEPS, progress=False)
  return {"params": _sha256(res.params), "digests": [e.digest for e in res.transcript],
          "projections_digests": [e.projections_digest for e in res.transcript]}


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
def test_two_processes_in_aggregate_mode_verify_clean(runs, aggregate_single_process_run):
  results = runs["agg_clean"]
  assert [r["returncode"] for r in results] == [0, 0], _failure(results)
  lead, follower = (r["json"] for r in results)
  assert lead["summary"]["verified"] is True and lead["summary"]["num_verified"] == STEPS
  assert follower["follow"] == {"command": "STOP", "steps": STEPS}
  assert lead["witness_shards"] == [list(range(SHARDS))] * STEPS
  # The mean over both processes (so every coin and projection), bit for bit.
  ref = aggregate_single_process_run
  assert lead["digests"] == ref["digests"] and lead["params"] == ref["params"]
  assert lead["projections_digests"] == ref["projections_digests"]


@pytest.mark.slow
def test_a_tampered_shard_on_process_1_is_caught_in_aggregate_mode(runs):
  """Shard 2 (process 1's) tampered before the mean and answered for
  consistently: the sum adds up, its re-computation does not."""
  results = runs["agg_attack"]
  assert [r["returncode"] for r in results] == [3, 3], _failure(results)
  lead, follower = (r["json"] for r in results)
  assert lead["violation"]["step"] == 0 and lead["violation"]["shard"] == 2
  assert lead["violation"]["leaf"].startswith("projection ")
  assert lead["summary"]["steps"] == 0 and follower["follow"] == {"command": "HALT", "steps": 1}


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
  assert summary["shard_mode"] == "aggregate"
  assert follower["stdout"] == ""


@pytest.mark.slow
def test_process_0_failing_inside_a_step_ends_the_followers(runs):
  """Process 0 raises inside step 1 and stays up (as a notebook's kernel):
  the follower, waiting in that step's collective, exits with the abort code
  and process 0's error, while process 0 is still up."""
  lead, follower = runs["lead_raises"]
  assert lead["json"]["error"] == "RuntimeError: the worker of process 0 failed at step 1", \
      _failure(runs["lead_raises"])
  assert follower["returncode"] == ginn.MultiHostWorker.ABORT_EXIT_CODE, _failure(runs["lead_raises"])
  assert ("process 0 failed inside step 1: RuntimeError: the worker of process 0 failed at step 1"
          in follower["stderr"])
  assert follower["exited_at"] < lead["exited_at"]  # Not released by process 0's exit.
  print(f"the follower exited {follower['exited_at'] - lead['json']['raised_at']:.2f} s after "
        "process 0's error")


@pytest.mark.slow
def test_process_0_dying_inside_a_step_ends_the_followers(runs):
  lead, follower = runs["lead_dies"]
  assert lead["returncode"] == 9, _failure(runs["lead_dies"])
  assert follower["returncode"] not in (0, None), _failure(runs["lead_dies"])
  # Its collective fails (gloo: connection reset), or jax.distributed's error
  # polling, finding the coordination service gone, ends it first.
  said = (follower["json"] or {}).get("error", "") + follower["stderr"]
  assert "Gloo" in said or "distributed service detected fatal errors" in said, said[-2000:]
  assert "follow" not in (follower["json"] or {})
  print(f"the follower exited {follower['exited_at'] - lead['exited_at']:.2f} s after process 0")


@pytest.mark.slow
def test_processes_that_disagree_stop_with_an_error_naming_the_fields(runs):
  results = runs["disagree"]
  assert [r["returncode"] for r in results] == [2, 2], _failure(results)
  for me, other, (mine, theirs) in ((0, 1, (32, 64)), (1, 0, (64, 32))):
    err = results[me]["stderr"]
    assert "ProcessDisagreement" in err or "different settings" in err, err[-2000:]
    assert f"batch_size: {mine} here, {theirs} on process {other}" in err, err[-2000:]
    assert "dataset_digest:" in err and "input_shape: [" in err, err[-2000:]
    assert results[me]["stdout"] == ""


@pytest.mark.slow
def test_a_killed_multi_process_run_resumes_bitwise(runs):
  """Every process killed (SIGKILL) at a random step, the same command again:
  the run continues from its newest checkpoint, and its transcript's steps and
  final parameters are those of the uninterrupted run, bit for bit; it audits
  clean."""
  from ginn_jax._src.audit import audit_run

  for name in ("persisted", "resumed"):
    assert [r["returncode"] for r in runs[name]] == [0, 0], _failure(runs[name])
  killed = runs["killed_records"]
  assert not [r for r in killed if r["type"] == "close"]  # Killed before its end.
  assert max(r["body"]["step"] for r in killed if r["type"] == "step") >= runs["kill_at"]
  whole = json.loads(runs["persisted"][0]["stdout"])
  resumed = json.loads(runs["resumed"][0]["stdout"])
  assert whole["resumed_from"] is None and resumed["resumed_from"] is not None
  # From the newest checkpoint the killed run recorded.
  assert resumed["resumed_from"] == max(r["body"]["step"] for r in killed if r["type"] == "checkpoint")
  assert resumed["steps"] == whole["steps"] == RESUME_STEPS
  assert resumed["final_digest"] == whole["final_digest"]
  assert resumed["num_verified"] == whole["num_verified"]
  assert resumed["public_key"] == whole["public_key"]
  steps = {}
  for name, d in runs["run_dirs"].items():
    records = _records(d / "transcript.jsonl")
    steps[name] = [(r["type"], r["body"]) for r in records if r["type"] in ("step", "check")]
    assert [r["type"] for r in records].count("resume") == (name == "killed")
  assert steps["killed"] == steps["persisted"]  # Every step once, each the same.
  assert [b["step"] for t, b in steps["killed"] if t == "step"] == list(range(RESUME_STEPS))
  report = audit_run(str(runs["run_dirs"]["killed"]), public_key=whole["public_key"])
  assert report.ok, [str(i) for i in report.items if not i.ok]


@pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="needs SO_REUSEPORT")
def test_a_reserved_port_goes_to_the_coordinator_only():
  """While reserved, no bind to port 0 gets the port, a plain bind of it fails,
  and a coordinator-like listener (SO_REUSEPORT, all addresses) gets it."""
  reservation = _PortReservation()
  others = [socket.socket() for _ in range(200)]
  try:
    for other in others:
      other.bind(("127.0.0.1", 0))
    assert reservation.port not in {other.getsockname()[1] for other in others}
    with socket.socket() as plain, pytest.raises(OSError):
      plain.bind(("127.0.0.1", reservation.port))
    with socket.socket() as coordinator:
      coordinator.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
      coordinator.bind(("0.0.0.0", reservation.port))
      coordinator.listen()
  finally:
    for other in others:
      other.close()
    reservation.close()


def test_a_run_that_hangs_is_killed_and_named(tmp_path, monkeypatch):
  """An idle run (here: a sleep) is killed once no process of it used CPU for
  HANG_S; a busy one is left alone; the port and the processes are freed."""
  monkeypatch.setattr(sys.modules[__name__], "HANG_S", 1.5)
  sleeper = Launch(tmp_path, "hang", [], num_processes=1, devices=2,
                   command=[sys.executable, "-c", "import time; time.sleep(600)"])
  busy = Launch(tmp_path, "busy", [], num_processes=1, devices=2,
                command=[sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() < t + 4: pass"])
  start = time.monotonic()
  assert _wait({"hang": sleeper, "busy": busy}) == ["hang"]
  assert time.monotonic() - start < 60
  assert [r["returncode"] for r in sleeper.results() + busy.results()] == [-signal.SIGKILL, 0]
  assert not [proc for proc in _LIVE if proc in sleeper.procs + busy.procs]


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


def test_projection_requests_are_answered_in_one_process_as_by_the_inner_worker(mlp, small_data,
                                                                                 multihost_worker):
  from ginn_jax._src.trusted import projection

  images, labels = small_data
  inner, worker = multihost_worker
  assert inner.aggregate  # The default shard mode for S > 1.
  rt = ginn.TrustedRuntime(mlp, images, labels, ginn.ProtocolConfig(batch_size=32, num_shards=SHARDS))
  order = rt.next_order()
  worker(order)
  shapes = [p.shape for p in jax.tree_util.tree_leaves(order.params)]
  vectors = projection.projection_vectors(np.array([5, 6], np.uint32), shapes, ginn.trusted_device())
  request = ginn.ProjectionRequest(step=0, order=order, vectors=vectors)
  got = worker.project(request)
  want = np.asarray(jax.device_get(inner.project(request).values))
  assert isinstance(got.values, np.ndarray) and got.values.shape == (SHARDS, len(shapes))
  assert got.step == 0 and got.values.tobytes() == want.tobytes()


def test_agreement_fields_name_what_differs(mlp, small_data):
  """In one process `check_agreement` exchanges nothing and returns the
  fields; each setting the processes must share changes its own field."""
  images, labels = small_data
  data = ginn.Batch(images, labels)
  cfg = ginn.ProtocolConfig(batch_size=32, num_shards=SHARDS, p_witness=0.5)
  base = ginn.check_agreement(mlp, data, cfg)
  assert base == ginn.agreement_fields(mlp, data, cfg)
  assert base["shard_mode"] == getattr(cfg, "shard_mode", "per_shard")
  assert base["jax_version"] == jax.__version__ and base["witness_plan"]
  changed = {
      "batch_size": ginn.agreement_fields(mlp, data, ginn.ProtocolConfig(
          batch_size=64, num_shards=SHARDS, p_witness=0.5)),
      "num_shards": ginn.agreement_fields(mlp, data, ginn.ProtocolConfig(
          batch_size=32, num_shards=2, p_witness=0.5)),
      "dataset_digest": ginn.agreement_fields(mlp, ginn.Batch(images[:256], labels[:256]), cfg),
      "model_parameters": ginn.agreement_fields(
          ginn.get_model("mlp", input_shape=(28, 28, 1), num_classes=5), data, cfg),
      "config.seed": ginn.agreement_fields(mlp, data, ginn.ProtocolConfig(
          seed=1, batch_size=32, num_shards=SHARDS, p_witness=0.5)),
  }
  for name, fields in changed.items():
    differ = {k for k in base if base[k] != fields[k]}
    assert name in differ, (name, differ)
    # The witness plan follows the shard's batch; nothing else moves.
    assert differ <= {name, "witness_plan"}, (name, differ)
