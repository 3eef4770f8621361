"""The training loop users call: orders out, reports in, progress shown."""
from __future__ import annotations

import dataclasses
from typing import Any

from ginn_jax._src import progress as progress_lib

from ginn_jax._src import errors
from ginn_jax._src.trusted.runtime import TranscriptEntry, TrustedRuntime
from ginn_jax._src.types import Params
from ginn_jax._src.worker.honest import Worker


@dataclasses.dataclass(frozen=True)
class TrainResult:
  """What a run produced.

  Attributes:
    params: parameters after the last accepted step (trusted device).
    steps: number of accepted steps.
    losses: reported loss of every accepted step.
    num_verified: steps drawn for a check (re-computation or witness) whose
      checks all passed; with shards, a step counts once however many of its
      shards were checked.
    num_violations: 0, or 1 if the run halted on a violation.
    transcript: the transcript entries so far (step, digest, MAC, verified, outcome).
    violation: the `IntegrityViolation` that halted the run, if any.
    num_pending: sampled steps whose deferred check had not finished.
    verified: True only if the run finished with every sampled check passed
      and none pending.
  """

  params: Params
  steps: int
  losses: list[float]
  num_verified: int
  num_violations: int
  transcript: list[TranscriptEntry]
  violation: errors.IntegrityViolation | None = None
  num_pending: int = 0

  @property
  def verified(self) -> bool:
    return self.violation is None and self.num_pending == 0

  def summary(self) -> dict[str, Any]:
    return {
        "steps": self.steps,
        "num_verified": self.num_verified,
        "num_violations": self.num_violations,
        "verified": self.verified,
        "final_loss": self.losses[-1] if self.losses else None,
        "violation_step": None if self.violation is None else self.violation.step,
    }


def _result(runtime: TrustedRuntime) -> TrainResult:
  return TrainResult(
      params=runtime.state.params,
      steps=runtime.step,
      losses=[e.loss for e in runtime.transcript if e.kind == "step" and e.outcome != "violation"],
      num_verified=runtime.num_verified,
      num_violations=runtime.num_violations,
      transcript=list(runtime.transcript),
      violation=runtime.halted,
      num_pending=runtime.num_pending,
  )


def train(runtime: TrustedRuntime, worker: Worker, num_steps: int, *,
          progress: bool | str = True, raise_on_violation: bool = True,
          finalize: bool = True) -> TrainResult:
  """Runs `num_steps` verified steps of `runtime` with `worker`.

  Args:
    runtime: the trusted runtime (holds the state; training continues from its step).
    worker: anything with the worker interface.
    num_steps: steps to run from the runtime's current step.
    progress: show a progress bar (a string is used as its label).
    raise_on_violation: re-raise the `IntegrityViolation` (with the partial
      result attached as ``.result``); if False, return the partial result with
      ``violation`` set.
    finalize: wait for every deferred check before returning (set False to
      call `train` again on the same runtime without draining in between;
      the result then reports ``num_pending`` and is not ``verified``).

  Returns:
    A `TrainResult`.

  Raises:
    IntegrityViolation: a verified step disagreed with its recomputation.
    ReportRejected: the worker sent a malformed report (state unchanged).
  """
  witness = getattr(worker, "witness", None)  # Asked only on steps drawn for a witness check.
  project = getattr(worker, "project", None)  # Asked on every step of an "aggregate" run.
  desc = progress if isinstance(progress, str) else "ginn train"
  bar = progress_lib.bar(total=num_steps, desc=desc, enabled=bool(progress))
  try:
    for i in range(num_steps):
      entry = runtime.submit(worker(runtime.next_order()), witness=witness, project=project)
      bar.update(1)
      if i % 10 == 0 or i == num_steps - 1:
        bar.set_postfix(loss=f"{entry.loss:.4f}", verified=runtime.num_verified,
                        pending=runtime.num_pending, violations=0)
    if finalize:
      runtime.finalize()  # Deferred checks: nothing is returned as verified while pending.
  except errors.IntegrityViolation as violation:
    violation.result = _result(runtime)
    bar.set_postfix(step=violation.step, verified=runtime.num_verified, violations=1)
    if raise_on_violation:
      raise
    return violation.result
  finally:
    bar.close()
  return _result(runtime)
