"""Synchronous and deferred verification of sampled steps (docs/design.md section 5).

Both modes run the same `Check` through the same function; deferred mode only
adds a bounded queue and one background thread:

* ``submit(check)`` runs the check now (synchronous) or enqueues it, blocking
  while `max_pending` checks are already queued (back-pressure: memory stays
  bounded by ``max_pending`` x (parameters + gradients)).
* results are handed back to the caller's thread through ``collect()``, so the
  transcript is only ever changed by the training thread.
* ``drain()`` waits until every queued check has finished.
"""
from __future__ import annotations

import dataclasses
import queue
import threading
from typing import Callable

import jax
import numpy as np

from ginn_jax._src.trusted import verify
from ginn_jax._src.types import Params


@dataclasses.dataclass(frozen=True)
class Check:
  """Everything needed to check step `step`: re-compute it and compare with its
  report (`recompute`), and/or check its witness (`witness` is set)."""

  step: int
  params: Params
  batch_indices: np.ndarray
  layer_key: jax.Array
  reported: list[jax.Array]
  loss: np.float32
  recompute: bool = True
  # (outputs, input_grads, prep) on the trusted device (see TrustedRuntime.receive_witness).
  witness: tuple | None = None
  witness_seed: np.ndarray | None = None  # Freivalds key data (secret).
  done: Callable[[], None] | None = None  # Called once the check has run (frees its witness).
  # With num_shards > 1: the shards to re-compute (`reported` then has a leading
  # shard axis and `loss` one loss per shard); None: the whole report.
  shards: tuple[int, ...] | None = None
  # With num_shards > 1 and a witness check: the challenged shards; `witness`
  # and `witness_seed` then hold one entry per shard.
  witness_shards: tuple[int, ...] | None = None
  # An "aggregate" step: (vectors, values) of its projection challenge. The drawn
  # shards are then checked by their projections (`reported` is the mean).
  projection: tuple | None = None


@dataclasses.dataclass(frozen=True)
class CheckResult:
  step: int
  comparison: verify.Comparison | verify.ShardComparisons | None  # The re-computation's, if it ran.
  error: BaseException | None = None  # An exception raised while checking.
  witness: verify.Comparison | None = None  # The witness check's, if it ran.


class Verifier:
  """Runs checks synchronously, or on a background thread behind a bounded queue.

  Args:
    recompute: ``recompute(check) -> (Comparison | None, Comparison | None)``,
      the re-computation's and the witness check's results.
    deferred: run checks on a background thread.
    max_pending: bound of the queue in deferred mode (>= 1).
  """

  def __init__(self, recompute: Callable[[Check], tuple[verify.Comparison | None, verify.Comparison | None]],
               *, deferred: bool = False,
               max_pending: int = 4):
    if max_pending < 1:
      raise ValueError(f"max_pending must be >= 1, got {max_pending}")
    self.deferred = deferred
    self.max_pending = max_pending
    self._recompute = recompute
    self._queue: queue.Queue[Check | None] = queue.Queue(maxsize=max_pending)
    self._done: list[CheckResult] = []
    self._lock = threading.Lock()
    self._thread: threading.Thread | None = None
    self.max_pending_seen = 0

  def _run(self, check: Check) -> CheckResult:
    try:
      comparison, witness = self._recompute(check)
      return CheckResult(check.step, comparison, witness=witness)
    except Exception as e:  # Reported to the training thread, never swallowed.
      return CheckResult(check.step, None, e)
    finally:
      if check.done is not None:
        check.done()

  def submit(self, check: Check) -> CheckResult | None:
    """Runs `check` now (synchronous: returns its result) or enqueues it (deferred: None)."""
    if not self.deferred:
      return self._run(check)
    if self._thread is None:
      self._thread = threading.Thread(target=self._worker, name="ginn-verifier", daemon=True)
      self._thread.start()
    self._queue.put(check)  # Blocks while the queue is full.
    self.max_pending_seen = max(self.max_pending_seen, self._queue.unfinished_tasks)
    return None

  def _worker(self) -> None:
    while True:
      check = self._queue.get()
      if check is None:
        self._queue.task_done()
        return
      result = self._run(check)
      del check  # Hold nothing of a finished check (its witness is freed now).
      with self._lock:
        self._done.append(result)
      self._queue.task_done()

  @property
  def pending(self) -> int:
    """Checks queued or running."""
    return self._queue.unfinished_tasks if self.deferred else 0

  def collect(self) -> list[CheckResult]:
    """Results finished since the last call, in completion order."""
    with self._lock:
      done, self._done = self._done, []
    return done

  def drain(self) -> list[CheckResult]:
    """Waits for every queued check; returns all uncollected results."""
    if self.deferred:
      self._queue.join()
    return self.collect()

  def close(self) -> None:
    """Stops the background thread after the queued checks."""
    if self._thread is not None:
      self._queue.put(None)
      self._thread.join()
      self._thread = None
