"""Validation, digest and MAC of a gradient report (docs/design.md section 4, 1-2).

`validate_report` reads the untrusted report and either raises a specific
`ReportRejected` or returns host copies of its leaves; it never touches the
trusted state. `report_digest` hashes those copies canonically; `report_mac`
authenticates the digest.
"""
from __future__ import annotations

import hashlib
import hmac
import numbers

import jax
import numpy as np

from ginn_jax._src import errors
from ginn_jax._src.boundary import GradientReport
from ginn_jax._src.types import Params

DIGEST_DOMAIN = b"ginn_jax/report/v1"


def _path_str(path) -> str:
  return jax.tree_util.keystr(path) or "<root>"


def validate_report(
    report: object, *, step: int, params: Params
) -> tuple[list[np.ndarray], np.float32]:
  """Checks a report's form against the parameters it is a gradient of.

  Args:
    report: anything the worker returned.
    step: the step the trusted runtime ordered.
    params: the parameters of that step (gives structure, shapes, dtypes).

  Returns:
    The gradient leaves as host numpy arrays in the parameters' tree order,
    and the loss as a float32 scalar.

  Raises:
    MalformedReport, StepMismatch, StructureMismatch, ShapeMismatch,
    DtypeMismatch, NonFiniteReport: each with the step and the leaf path.
  """
  if not isinstance(report, GradientReport):
    raise errors.MalformedReport(
        f"step {step}: expected a GradientReport, got {type(report).__name__}", step=step
    )
  rstep = report.step
  if isinstance(rstep, (bool, np.bool_)) or not isinstance(rstep, numbers.Integral) or rstep != step:
    raise errors.StepMismatch(
        f"report is for step {rstep!r} but step {step} was ordered (stale, replayed or "
        "out-of-order report); send the report for the current work order",
        step=step, where="step",
    )
  loss = _validate_loss(report.loss, step)

  param_leaves, param_def = jax.tree_util.tree_flatten_with_path(params)
  try:
    grad_leaves, grad_def = jax.tree_util.tree_flatten_with_path(report.grads)
  except Exception as e:  # A pytree node whose flatten raises.
    raise errors.StructureMismatch(
        f"step {step}: gradient tree cannot be flattened: {e}", step=step, where="grads"
    ) from e
  if grad_def != param_def:
    want = {_path_str(p) for p, _ in param_leaves}
    got = {_path_str(p) for p, _ in grad_leaves}
    missing, extra = sorted(want - got), sorted(got - want)
    raise errors.StructureMismatch(
        f"step {step}: gradient tree does not match the parameters "
        f"(missing leaves: {missing[:5] or 'none'}; unexpected leaves: {extra[:5] or 'none'}; "
        f"expected structure {param_def}, got {grad_def})",
        step=step, where=(missing or extra or ["grads"])[0],
    )

  host: list[np.ndarray] = []
  for (path, p), (_, g) in zip(param_leaves, grad_leaves):
    where = _path_str(path)
    if not isinstance(g, (jax.Array, np.ndarray)):
      raise errors.MalformedReport(
          f"step {step}: gradient leaf {where} is a {type(g).__name__}, not an array",
          step=step, where=where,
      )
    if tuple(g.shape) != tuple(p.shape):
      raise errors.ShapeMismatch(
          f"step {step}: gradient leaf {where} has shape {tuple(g.shape)}, "
          f"the parameter has shape {tuple(p.shape)}",
          step=step, where=where,
      )
    if g.dtype != p.dtype:
      raise errors.DtypeMismatch(
          f"step {step}: gradient leaf {where} has dtype {g.dtype}, the parameter has {p.dtype}",
          step=step, where=where,
      )
    h = np.asarray(jax.device_get(g))
    if not np.isfinite(h).all():
      bad = int(np.size(h) - np.count_nonzero(np.isfinite(h)))
      raise errors.NonFiniteReport(
          f"step {step}: gradient leaf {where} holds {bad} NaN/Inf value(s)", step=step, where=where
      )
    host.append(np.ascontiguousarray(h))
  return host, loss


def _validate_loss(loss: object, step: int) -> np.float32:
  if isinstance(loss, (bool, np.bool_)) or not isinstance(
      loss, (numbers.Real, np.ndarray, np.generic, jax.Array)
  ):
    raise errors.MalformedReport(
        f"step {step}: loss is a {type(loss).__name__}, expected a real scalar", step=step, where="loss"
    )
  value = np.asarray(jax.device_get(loss))
  if value.shape != () or value.dtype.kind not in "fiu":
    raise errors.MalformedReport(
        f"step {step}: loss must be a real scalar, got shape {value.shape} dtype {value.dtype}",
        step=step, where="loss",
    )
  value = np.float32(value)
  if not np.isfinite(value):
    raise errors.NonFiniteReport(f"step {step}: loss is {value}", step=step, where="loss")
  return value


def report_digest(step: int, leaves: list[np.ndarray], loss: np.float32) -> bytes:
  """SHA-256 of the report's canonical bytes: domain, step, loss, then each
  leaf's dtype, shape and little-endian bytes in the parameters' tree order."""
  h = hashlib.sha256(DIGEST_DOMAIN)
  h.update(step.to_bytes(8, "big"))
  h.update(np.asarray(loss, "<f4").tobytes())
  hash_leaves(h, leaves)
  return h.digest()


def hash_leaves(h, leaves) -> None:
  """Feeds each host array's dtype, shape and little-endian bytes into hash `h`
  (the canonical leaf encoding of report and parameter digests)."""
  for leaf in leaves:
    leaf = np.ascontiguousarray(leaf)
    h.update(f"{leaf.dtype.str}{leaf.shape}".encode())
    h.update(memoryview(leaf.astype(leaf.dtype.newbyteorder("<"), copy=False).reshape(-1)).cast("B"))


def report_mac(mac_key: bytes, digest: bytes) -> bytes:
  """HMAC-SHA256 of a report digest under the runtime's MAC key."""
  return hmac.new(mac_key, digest, hashlib.sha256).digest()
