"""Comparing a report with the trusted recomputation (docs/design.md section 5)."""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from ginn_jax._src import errors
from ginn_jax._src.types import Params

_TINY = 1e-30


@dataclasses.dataclass(frozen=True)
class Tolerance:
  """Largest honest disagreement accepted, per leaf.

  Attributes:
    rel_l2: bound on ``||g_rep - g_ref|| / max(||g_ref||, tiny)``.
    max_abs: bound on ``max|g_rep - g_ref| / max(max|g_ref|, tiny)``.
  """

  rel_l2: float
  max_abs: float

  def __post_init__(self):
    for name in ("rel_l2", "max_abs"):
      v = getattr(self, name)
      if not (isinstance(v, (int, float)) and v >= 0 and not math.isnan(v)):
        raise ValueError(f"Tolerance.{name} must be a non-negative number, got {v!r}")

  def to_dict(self) -> dict[str, float]:
    return {"rel_l2": float(self.rel_l2), "max_abs": float(self.max_abs)}

  @classmethod
  def from_dict(cls, d: dict) -> "Tolerance":
    return cls(rel_l2=float(d["rel_l2"]), max_abs=float(d["max_abs"]))


# What two honest runs on the same CPU may differ by at most when nothing was
# calibrated (docs/design.md 5: 1 vs 2 threads differ by 7e-9, f32 vs f64 by 2.4e-7).
DEFAULT_FLOOR = Tolerance(rel_l2=1e-5, max_abs=1e-5)
# The witness check's floor. Honest Freivalds errors on CPU are mostly below
# 5e-6 relative, but late in training, when gradients cancel, rare steps reach
# more: 2.5e-5 (max-abs, Dense_0 input gradient) at step 1,294 of 2,000 honest
# mnist_cnn steps. Tampering with one gradient entry by 1% of its leaf's
# maximum shows 3.5e-4 and more, scaling a layer's gradient by 1.001 about 1e-3.
DEFAULT_WITNESS_FLOOR = Tolerance(rel_l2=1e-4, max_abs=1e-4)
# The paper's prototype tolerance: 1% relative or 0.05 absolute per element.
PAPER_PROTOTYPE = Tolerance(rel_l2=1e-2, max_abs=5e-2)
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


@dataclasses.dataclass(frozen=True)
class Comparison:
  """Per-leaf errors of one verified step, worst first by ratio to tolerance."""

  paths: tuple[str, ...]
  errors: np.ndarray  # [num_leaves, 2] (rel_l2, max_abs)

  @property
  def max_rel_l2(self) -> float:
    return float(np.max(self.errors[:, 0]))

  @property
  def max_max_abs(self) -> float:
    return float(np.max(self.errors[:, 1]))

  def first_violation(self, tol: Tolerance) -> int | None:
    """Index of the first leaf (tree order) outside `tol`; NaN counts as outside."""
    ok = (self.errors[:, 0] <= tol.rel_l2) & (self.errors[:, 1] <= tol.max_abs)
    bad = np.flatnonzero(~ok)
    return int(bad[0]) if bad.size else None


def leaf_paths(params: Params) -> tuple[str, ...]:
  """``jax.tree_util.keystr`` of every leaf of `params`, plus "loss" last."""
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  return (*paths, "loss")


def compare(
    reported: list[jax.Array], reported_loss: jax.Array,
    reference: list[jax.Array], reference_loss: jax.Array,
    paths: tuple[str, ...],
) -> Comparison:
  """Errors of a report against the reference, leaf by leaf (the loss last)."""
  errs = _leaf_errors([*reported, reported_loss[None]], [*reference, reference_loss[None]])
  return Comparison(paths=paths, errors=np.asarray(jax.device_get(errs), dtype=np.float64))


def check(comparison: Comparison, tol: Tolerance, *, step: int,
          violation: type[errors.IntegrityViolation] = errors.IntegrityViolation) -> None:
  """Raises `violation` (an `IntegrityViolation`) naming the first leaf, or
  witness check, outside `tol`."""
  i = comparison.first_violation(tol)
  if i is not None:
    rel, mx = comparison.errors[i]
    raise violation(
        step=step, leaf=comparison.paths[i],
        error={"rel_l2": float(rel), "max_abs": float(mx)}, tolerance=tol,
    )
