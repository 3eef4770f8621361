"""Exceptions raised at the trust boundary.

Two families: a `ReportRejected` is a report the trusted runtime refused before
it touched any state (training can go on with a corrected report); an
`IntegrityViolation` is a report that passed every check of form but whose
content disagrees with the trusted recomputation (training halts).
"""
from __future__ import annotations

from typing import Any


class GinnError(Exception):
  """Base class of every error ginn_jax raises on purpose."""


class ReportRejected(GinnError, ValueError):
  """A gradient report was refused; the trusted state is unchanged.

  Attributes:
    step: the step the trusted runtime expected.
    where: the leaf path (or field) the problem was found at.
    shard: the shard it was found in (reports with ``num_shards > 1``), else None.
  """

  def __init__(self, message: str, *, step: int, where: str = "", shard: int | None = None):
    super().__init__(message)
    self.step = step
    self.where = where
    self.shard = shard


class StepMismatch(ReportRejected):
  """The report is for another step than the one ordered (stale or replayed)."""


class MalformedReport(ReportRejected):
  """The report is not a `GradientReport` or its loss is not a scalar."""


class StructureMismatch(ReportRejected):
  """The gradient tree has missing, extra or renamed leaves."""


class ShapeMismatch(ReportRejected):
  """A gradient leaf's shape differs from its parameter's."""


class DtypeMismatch(ReportRejected):
  """A gradient leaf's dtype differs from its parameter's."""


class NonFiniteReport(ReportRejected):
  """The report holds NaN or Inf."""


class IntegrityViolation(GinnError, RuntimeError):
  """A verified step's report disagrees with the trusted recomputation.

  Attributes:
    step: the training step whose report failed verification.
    leaf: the path of the first leaf (in tree order) outside tolerance.
    error: ``{"rel_l2": ..., "max_abs": ...}`` measured at that leaf; for an
      element-wise tolerance also ``num_broken`` and ``num_elements`` there.
    tolerance: the tolerance it was compared with.
    breaks: for an element-wise tolerance, one dict per leaf with breaking
      elements (tree order): ``leaf``, ``count``, ``size``, the first few
      ``indices`` and the ``reported`` and ``reference`` values there; None
      for a per-leaf tolerance.
    result: set by `ginn_jax.train` to the partial `TrainResult` (parameters
      as of the last accepted step, transcript so far), so nothing is lost.
    shard: the shard whose re-computation disagreed (``num_shards > 1``), else None.
  """

  check = "recompute"

  def __init__(self, *, step: int, leaf: str, error: dict[str, float], tolerance: Any,
               breaks: list[dict[str, Any]] | None = None, shard: int | None = None):
    self.step = step
    self.shard = shard
    self.leaf = leaf
    self.error = error
    self.tolerance = tolerance
    self.breaks = breaks
    self.result: Any = None
    if breaks:
      what = (f"{sum(b['count'] for b in breaks):,} elements in {len(breaks)} "
              f"{'leaf' if len(breaks) == 1 else 'leaves'} break the "
              f"element-wise tolerance (a reported, b trusted: accepted if |a-b| < "
              f"{tolerance.rel_l2:.3g}*max(|a|,|b|) or |a-b| < {tolerance.max_abs:.3g}): "
              f"{_describe_breaks(breaks)}. ")
    else:
      what = (f"leaf {leaf} differs from the trusted recomputation by rel_l2={error['rel_l2']:.3e}, "
              f"max_abs={error['max_abs']:.3e} (tolerance rel_l2<={tolerance.rel_l2:.3e}, "
              f"max_abs<={tolerance.max_abs:.3e}). ")
    where = f"step {step}" if shard is None else f"step {step}, shard {shard}"
    super().__init__(
        f"integrity violation at {where}: {what}"
        "The worker's report for this step is not the gradient the model, batch and key "
        "define; training is halted and no further update is applied."
    )


def _describe_breaks(breaks: list[dict[str, Any]], max_leaves: int = 6) -> str:
  parts = []
  for b in breaks[:max_leaves]:
    first = ", ".join(f"{tuple(i)} {r:.4g} vs {t:.4g}"
                      for i, r, t in zip(b["indices"], b["reported"], b["reference"]))
    parts.append(f"{b['leaf']}: {b['count']:,} of {b['size']:,} (first: {first})")
  more = len(breaks) - max_leaves
  return "; ".join(parts) + (f"; and {more} more leaves" if more > 0 else "")


class WitnessViolation(IntegrityViolation):
  """A step drawn for a witness check failed it (docs/design.md section 10).

  Either the witness was missing, late or malformed (`reason` says what, and
  `error` is None), or one of its Freivalds checks was outside the witness
  tolerance: then `leaf` names the layer and the check, e.g.
  ``"layer 2 (Conv_2) weight_grad"``.
  """

  check = "witness"

  def __init__(self, *, step: int, leaf: str, error: dict[str, float] | None = None,
               tolerance: Any = None, reason: str | None = None,
               breaks: list[dict[str, Any]] | None = None, shard: int | None = None):
    self.step = step
    self.shard = shard
    self.leaf = leaf
    self.error = error
    self.tolerance = tolerance
    self.reason = reason
    self.breaks = breaks
    self.result: Any = None
    at = f"step {step}" if shard is None else f"step {step}, shard {shard}"
    if error is None:
      msg = (f"integrity violation at {at}: the witness check failed at {leaf}: {reason}. "
             "The step's report was already committed, so a missing, late or malformed witness "
             "is a violation; training is halted and no further update is applied.")
    else:
      msg = (f"integrity violation at {at}: witness check {leaf} is off by "
             f"rel_l2={error['rel_l2']:.3e}, max_abs={error['max_abs']:.3e} (witness tolerance "
             f"rel_l2<={tolerance.rel_l2:.3e}, max_abs<={tolerance.max_abs:.3e}). The worker's "
             "report and witness for this step are not what the model, batch and key define; "
             "training is halted and no further update is applied.")
    GinnError.__init__(self, msg)


class ProjectionViolation(IntegrityViolation):
  """A step of an ``"aggregate"`` run failed its projection challenge
  (docs/design.md section 11.2): the worker's scalars ``v_{s,l} = <r_l, g_{s,l}>``
  were missing, late or malformed (`reason` says what, `error` is None), did
  not add up to S times the projection of the committed mean (`shard` None),
  or disagreed with the trusted side's own projection of a checked shard.

  `leaf` names the gradient leaf (``"projections"`` when no leaf is at fault).
  """

  check = "projection"

  def __init__(self, *, step: int, leaf: str, error: dict[str, float] | None = None,
               tolerance: Any = None, reason: str | None = None, shard: int | None = None,
               breaks: list[dict[str, Any]] | None = None):
    self.step = step
    self.shard = shard
    self.leaf = leaf
    self.error = error
    self.tolerance = tolerance
    self.reason = reason
    self.breaks = breaks
    self.result: Any = None
    at = f"step {step}" if shard is None else f"step {step}, shard {shard}"
    if error is None:
      what = f"the projection challenge failed at {leaf}: {reason}"
    else:
      what = (f"the projection of leaf {leaf} is off by {error['rel']:.3e} (tolerance "
              f"{error['tolerance']:.3e}){': ' + reason if reason else ''}")
    GinnError.__init__(
        self, f"integrity violation at {at}: {what}. The step's mean gradient was already "
        "committed, so every failure to account for it is a violation; training is halted and "
        "no further update is applied.")


class RuntimeHalted(GinnError, RuntimeError):
  """The trusted runtime refused to continue after an integrity violation."""


class ProcessDisagreement(GinnError, RuntimeError):
  """The processes of a multi-process run were started with different
  settings (model, data, batch size, shards, shard mode, code); raised on
  every process by `ginn_jax.check_agreement`, before any work order.

  Attributes:
    differences: ``(field, value here, process, value there)`` for each field
      another process disagrees on (its value None where it did not answer).
  """

  def __init__(self, message: str, differences: list[tuple[str, Any, int, Any]] | None = None):
    super().__init__(message)
    self.differences = list(differences or [])
