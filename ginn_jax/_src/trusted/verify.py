"""Comparing a report with the trusted recomputation (docs/design.md section 5)."""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from ginn_jax._src import errors
from ginn_jax._src.types import Params

_TINY = 1e-30


PER_LEAF = "per_leaf"
ELEMENTWISE = "elementwise"
_MODES = (PER_LEAF, ELEMENTWISE)


@dataclasses.dataclass(frozen=True)
class Tolerance:
  """Largest honest disagreement accepted.

  Two modes, named by `mode`:

  * ``"per_leaf"`` (the default, calibrated by `calibrate_tolerance`): a leaf
    passes if ``||g_rep - g_ref|| / max(||g_ref||, tiny) <= rel_l2`` and
    ``max|g_rep - g_ref| / max(max|g_ref|, tiny) <= max_abs``.
  * ``"elementwise"`` (the paper prototype's rule, `PAPER_PROTOTYPE_TOLERANCE`):
    every element a (reported) / b (trusted) of every leaf must satisfy
    ``|a - b| < rel_l2 * max(|a|, |b|)`` **or** ``|a - b| < max_abs``: `rel_l2`
    is then a per-element relative bound and `max_abs` an absolute bound on
    the raw (unclipped) gradient, not normalised by anything. Make one with
    `Tolerance.per_element`.

  Attributes:
    rel_l2: per-leaf relative L2 bound, or the per-element relative bound.
    max_abs: per-leaf normalised max-abs bound, or the per-element absolute bound.
    mode: ``"per_leaf"`` or ``"elementwise"``.

  Example::

    ginn.Tolerance(rel_l2=1e-5, max_abs=1e-5)           # per leaf
    ginn.Tolerance.per_element(rel=0.01, absolute=0.05)  # the paper's rule
  """

  rel_l2: float
  max_abs: float
  mode: str = PER_LEAF

  def __post_init__(self):
    for name in ("rel_l2", "max_abs"):
      v = getattr(self, name)
      if not (isinstance(v, (int, float)) and v >= 0 and not math.isnan(v)):
        raise ValueError(f"Tolerance.{name} must be a non-negative number, got {v!r}")
    if self.mode not in _MODES:
      raise ValueError(f"Tolerance.mode must be one of {_MODES}, got {self.mode!r}")

  @classmethod
  def per_element(cls, *, rel: float, absolute: float) -> "Tolerance":
    """The element-wise rule: accept ``|a-b| < rel*max(|a|,|b|)`` or ``|a-b| < absolute``."""
    return cls(rel_l2=rel, max_abs=absolute, mode=ELEMENTWISE)

  @property
  def elementwise(self) -> bool:
    return self.mode == ELEMENTWISE

  def describe(self) -> str:
    """The rule in words, e.g. for an error message or a table."""
    if self.elementwise:
      return (f"element-wise: |a-b| < {self.rel_l2:.3g}*max(|a|,|b|) or |a-b| < {self.max_abs:.3g}")
    return f"per leaf: rel_l2<={self.rel_l2:.3e}, max_abs<={self.max_abs:.3e}"

  def to_dict(self) -> dict[str, float | str]:
    """JSON form; a per-leaf tolerance has no ``mode`` key (as before it existed)."""
    d: dict[str, float | str] = {"rel_l2": float(self.rel_l2), "max_abs": float(self.max_abs)}
    if self.mode != PER_LEAF:
      d["mode"] = self.mode
    return d

  @classmethod
  def from_dict(cls, d: dict) -> "Tolerance":
    """Inverse of `to_dict`; a dict without ``mode`` (older run headers) is per leaf."""
    return cls(rel_l2=float(d["rel_l2"]), max_abs=float(d["max_abs"]), mode=str(d.get("mode", PER_LEAF)))


# What two honest runs on the same CPU may differ by at most when nothing was
# calibrated (docs/design.md 5: 1 vs 2 threads differ by 7e-9, f32 vs f64 by 2.4e-7).
DEFAULT_FLOOR = Tolerance(rel_l2=1e-5, max_abs=1e-5)
# The witness check's floor. Honest Freivalds errors on CPU are mostly below
# 5e-6 relative, but late in training, when gradients cancel, rare steps reach
# more: 2.5e-5 (max-abs, Dense_0 input gradient) at step 1,294 of 2,000 honest
# mnist_cnn steps. Tampering with one gradient entry by 1% of its leaf's
# maximum shows 3.5e-4 and more, scaling a layer's gradient by 1.001 about 1e-3.
DEFAULT_WITNESS_FLOOR = Tolerance(rel_l2=1e-4, max_abs=1e-4)
# The paper prototype's rule (RF mode): every element a (reported), b (trusted)
# of the raw gradient passes if |a-b| < 0.01*max(|a|,|b|) or |a-b| < 0.05. With
# a narrow clip (C = 0.005 < 0.05) the absolute bound lets a worker report any
# value in the clip range for most coordinates (docs/experiments.md section 6).
PAPER_PROTOTYPE_TOLERANCE = Tolerance.per_element(rel=1e-2, absolute=5e-2)
PAPER_PROTOTYPE = PAPER_PROTOTYPE_TOLERANCE  # The name before issue 13 (then a per-leaf tolerance).
# The paper's two numbers read as per-leaf normalised bounds: what
# PAPER_PROTOTYPE was before issue 13. Far stricter than the paper's rule.
LOOSE_PER_LEAF_TOLERANCE = Tolerance(rel_l2=1e-2, max_abs=5e-2)
# Accepts anything finite: used by calibration to measure errors without halting.
UNBOUNDED = Tolerance(rel_l2=float("inf"), max_abs=float("inf"))


@jax.jit
def _leaf_errors(reported: list[jax.Array], reference: list[jax.Array]) -> jax.Array:
  """[num_leaves, 2] array of (rel_l2, max_abs) errors, computed in float32."""
  rows = []
  for r, g in zip(reported, reference):
    r = r.astype(jnp.float32)
    g = g.astype(jnp.float32)
    d = r - g
    rel_l2 = jnp.linalg.norm(d.ravel()) / jnp.maximum(jnp.linalg.norm(g.ravel()), _TINY)
    max_abs = jnp.max(jnp.abs(d)) / jnp.maximum(jnp.max(jnp.abs(g)), _TINY)
    rows.append(jnp.stack([rel_l2, max_abs]))
  return jnp.stack(rows)


# How many breaking elements an element-wise violation names per leaf.
NUM_INDICES_REPORTED = 5


@functools.partial(jax.jit, static_argnames=("rel", "absolute", "num_indices"))
def _element_breaks(reported: list[jax.Array], reference: list[jax.Array], *, rel: float,
                    absolute: float, num_indices: int):
  """Per leaf: how many elements break the element-wise rule, the flat indices of
  the first `num_indices` (-1 pads), and the reported and trusted values there."""
  counts, firsts, rep_vals, ref_vals = [], [], [], []
  for r, g in zip(reported, reference):
    a = r.astype(jnp.float32).ravel()
    b = g.astype(jnp.float32).ravel()
    d = jnp.abs(a - b)
    ok = (d < rel * jnp.maximum(jnp.abs(a), jnp.abs(b))) | (d < absolute)  # NaN: not ok.
    bad = jnp.logical_not(ok)
    counts.append(jnp.sum(bad, dtype=jnp.int32))
    idx = jnp.nonzero(bad, size=num_indices, fill_value=-1)[0].astype(jnp.int32)
    firsts.append(idx)
    safe = jnp.maximum(idx, 0)
    rep_vals.append(a[safe])
    ref_vals.append(b[safe])
  return jnp.stack(counts), jnp.stack(firsts), jnp.stack(rep_vals), jnp.stack(ref_vals)


@dataclasses.dataclass(frozen=True)
class LeafBreaks:
  """The elements of one leaf that break an element-wise tolerance.

  Attributes:
    leaf: the leaf's path (``"loss"`` for the loss).
    count: how many of its elements break the rule.
    size: how many elements it has.
    indices: the first few breaking elements (row-major order), as indices
      into the leaf's shape.
    reported, reference: the worker's and the trusted values there.
  """

  leaf: str
  count: int
  size: int
  indices: tuple[tuple[int, ...], ...]
  reported: tuple[float, ...]
  reference: tuple[float, ...]

  def to_dict(self) -> dict:
    return {"leaf": self.leaf, "count": self.count, "size": self.size,
            "indices": [list(i) for i in self.indices], "reported": list(self.reported),
            "reference": list(self.reference)}


@dataclasses.dataclass(frozen=True)
class Comparison:
  """Per-leaf errors of one verified step, and what an element-wise check needs.

  Attributes:
    paths: the leaves' paths, the loss last.
    errors: [num_leaves, 2] per-leaf (rel_l2, max_abs) errors.
    arrays: the (reported, reference) leaves, kept only when the tolerance
      was not known at `compare` time, so an element-wise tolerance can still
      be checked (`breaks`).
    elementwise: the element-wise result computed by `compare` for its
      tolerance, as ``(tolerance, breaks)``.
  """

  paths: tuple[str, ...]
  errors: np.ndarray  # [num_leaves, 2] (rel_l2, max_abs)
  arrays: tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]] | None = dataclasses.field(
      default=None, repr=False, compare=False)
  elementwise: tuple[Tolerance, tuple[LeafBreaks, ...]] | None = dataclasses.field(
      default=None, repr=False, compare=False)

  @property
  def max_rel_l2(self) -> float:
    return float(np.max(self.errors[:, 0]))

  @property
  def max_max_abs(self) -> float:
    return float(np.max(self.errors[:, 1]))

  def breaks(self, tol: Tolerance) -> tuple[LeafBreaks, ...]:
    """The leaves (tree order, the loss last) with elements that break the
    element-wise tolerance `tol`; empty if every element passes.

    Raises:
      ValueError: `tol` is not element-wise, or this comparison kept no arrays
        (e.g. a witness check, whose errors are per check, not per element).
    """
    if not tol.elementwise:
      raise ValueError(f"breaks() needs an element-wise tolerance, got {tol}")
    if self.elementwise is not None and self.elementwise[0] == tol:
      return self.elementwise[1]
    if self.arrays is None:
      raise ValueError(
          "this comparison kept no arrays to check an element-wise tolerance against: element-wise "
          "tolerances apply to the re-computed gradient, not to witness checks; pass the tolerance "
          "to compare() or use a per-leaf tolerance")
    return _breaks(self.paths, *self.arrays, tol)

  def first_violation(self, tol: Tolerance) -> int | None:
    """Index of the first leaf (tree order) outside `tol`; NaN counts as outside."""
    if tol.elementwise:
      bad = self.breaks(tol)
      return self.paths.index(bad[0].leaf) if bad else None
    ok = (self.errors[:, 0] <= tol.rel_l2) & (self.errors[:, 1] <= tol.max_abs)
    bad = np.flatnonzero(~ok)
    return int(bad[0]) if bad.size else None


def _breaks(paths: tuple[str, ...], reported, reference, tol: Tolerance) -> tuple[LeafBreaks, ...]:
  counts, firsts, rep, ref = jax.device_get(_element_breaks(
      list(reported), list(reference), rel=float(tol.rel_l2), absolute=float(tol.max_abs),
      num_indices=NUM_INDICES_REPORTED))
  out = []
  for i, (path, r) in enumerate(zip(paths, reported)):
    if counts[i] == 0:
      continue
    n = min(int(counts[i]), NUM_INDICES_REPORTED)
    flat = firsts[i, :n]
    out.append(LeafBreaks(
        leaf=path, count=int(counts[i]), size=int(np.prod(r.shape, dtype=np.int64)),
        indices=tuple(tuple(int(x) for x in np.unravel_index(int(f), r.shape)) for f in flat),
        reported=tuple(float(x) for x in rep[i, :n]), reference=tuple(float(x) for x in ref[i, :n])))
  return tuple(out)


def leaf_paths(params: Params) -> tuple[str, ...]:
  """``jax.tree_util.keystr`` of every leaf of `params`, plus "loss" last."""
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  return (*paths, "loss")


def compare(
    reported: list[jax.Array], reported_loss: jax.Array,
    reference: list[jax.Array], reference_loss: jax.Array,
    paths: tuple[str, ...], *, tolerance: Tolerance | None = None,
) -> Comparison:
  """Errors of a report against the reference, leaf by leaf (the loss last).

  Args:
    reported, reported_loss: the worker's gradient leaves and loss.
    reference, reference_loss: the trusted re-computation's.
    paths: the leaves' paths, the loss last (`leaf_paths`).
    tolerance: the tolerance the comparison will be checked against. An
      element-wise one is evaluated here; without one, the comparison keeps
      the arrays so that `check` can evaluate any tolerance later.

  Returns:
    The `Comparison`.
  """
  rep = (*reported, reported_loss[None])
  ref = (*reference, reference_loss[None])
  errs = _leaf_errors(list(rep), list(ref))
  arrays = elementwise = None
  if tolerance is None:
    arrays = (rep, ref)
  elif tolerance.elementwise:
    elementwise = (tolerance, _breaks(paths, rep, ref, tolerance))
  return Comparison(paths=paths, errors=np.asarray(jax.device_get(errs), dtype=np.float64),
                    arrays=arrays, elementwise=elementwise)


@dataclasses.dataclass(frozen=True)
class ShardComparisons:
  """The comparisons of the re-computed shards of one step (``num_shards > 1``).

  Attributes:
    shards: the shards re-computed, in increasing order.
    comparisons: each one's `Comparison` against the report's row of that shard.
  """

  shards: tuple[int, ...]
  comparisons: tuple[Comparison, ...]

  @property
  def max_rel_l2(self) -> float:
    return max(c.max_rel_l2 for c in self.comparisons)

  @property
  def max_max_abs(self) -> float:
    return max(c.max_max_abs for c in self.comparisons)


def check(comparison: Comparison | ShardComparisons, tol: Tolerance, *, step: int,
          violation: type[errors.IntegrityViolation] = errors.IntegrityViolation,
          shard: int | None = None) -> None:
  """Raises `violation` (an `IntegrityViolation`) naming the first leaf, or
  witness check, outside `tol`.

  For an element-wise `tol`, the violation also lists every leaf with
  breaking elements (`IntegrityViolation.breaks`: count, size and the first
  few indices with both values). `ShardComparisons` are checked shard by
  shard; the violation names the first shard outside `tol` (``.shard``).
  """
  if isinstance(comparison, ShardComparisons):
    for s, c in zip(comparison.shards, comparison.comparisons):
      check(c, tol, step=step, violation=violation, shard=s)
    return
  extra = {} if shard is None else {"shard": shard}
  if tol.elementwise:
    bad = comparison.breaks(tol)
    if bad:
      i = comparison.paths.index(bad[0].leaf)
      rel, mx = comparison.errors[i]
      raise violation(
          step=step, leaf=bad[0].leaf,
          error={"rel_l2": float(rel), "max_abs": float(mx), "num_broken": bad[0].count,
                 "num_elements": bad[0].size},
          tolerance=tol, breaks=[b.to_dict() for b in bad], **extra,
      )
    return
  i = comparison.first_violation(tol)
  if i is not None:
    rel, mx = comparison.errors[i]
    raise violation(
        step=step, leaf=comparison.paths[i],
        error={"rel_l2": float(rel), "max_abs": float(mx)}, tolerance=tol, **extra,
    )
