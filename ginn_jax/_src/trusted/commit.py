"""Receiving, validation, digest and MAC of a gradient report (docs/design.md section 4, 1-2).

The runtime's path, in the order it runs:

* `receive_report` checks the report's form (type, step, loss, tree, shapes,
  dtypes) and copies its leaves into trusted memory (the trusted device) in one
  batched, asynchronous transfer. Nothing after this reads the worker's
  buffers, so a worker that changes them later (or meanwhile) cannot change
  what is hashed, applied or verified.
* `digest_received` hashes the received copies, each leaf as soon as its
  transfer lands (while later leaves still arrive, and while the trusted
  update, dispatched before it, runs).
* `check_finite` reads the update's own per-leaf finiteness flags (the update
  reads every gradient value anyway; a separate host pass cost 4 ms on VGG-11)
  and names a leaf that holds NaN/Inf.
* `report_mac` authenticates the digest.

`validate_report` (host copies, no device) and `report_digest` (the digest of
host leaves) serve storage and the auditor. The digest's hash function is
named in the run's header (`DIGEST_NAMES`): "blake3" for new runs, "sha256"
for runs made before it (headers without a name).
"""
from __future__ import annotations

import dataclasses
import hashlib
import hmac
import numbers

import blake3
import jax
import numpy as np

from ginn_jax._src import errors
from ginn_jax._src.boundary import GradientReport
from ginn_jax._src.types import Params

DIGEST_DOMAIN = b"ginn_jax/report/v1"
# Hash functions a report digest may use; the run's header names one. BLAKE3 on
# every core hashes a VGG-11 report several times faster than SHA-256
# (docs/performance.md, "The ceiling").
DIGEST_NAMES = ("blake3", "sha256")
DEFAULT_DIGEST = "blake3"
LEGACY_DIGEST = "sha256"  # Headers written before the digest was named.
# Reports smaller than this are hashed on one thread: BLAKE3's thread pool costs
# more than it saves on them (measured: +0.6 ms on a 1.4 MB mnist_cnn report).
THREADED_BYTES = 16 << 20


def _path_str(path) -> str:
  return jax.tree_util.keystr(path) or "<root>"


def _check_form(
    report: object, *, step: int, params: Params, num_shards: int = 1, aggregate: bool = False
) -> tuple[list[jax.Array | np.ndarray], list[str], np.float32 | np.ndarray]:
  """Checks a report's form against the parameters it is a gradient of.

  Args:
    report: anything the worker returned.
    step: the step the trusted runtime ordered.
    params: the parameters of that step (gives structure, shapes, dtypes).
    num_shards: S. With S > 1 every gradient leaf must have shape
      ``(S, *param.shape)`` and the loss shape ``(S,)`` (a leading shard axis).
    aggregate: with S > 1, an ``"aggregate"`` report: every gradient leaf
      shaped as its parameter (the shards' mean), the loss shape ``(S,)``.

  Returns:
    The gradient leaves as the worker sent them, in the parameters' tree
    order, their paths, and the loss as a float32 scalar (S = 1) or a float32
    array of shape (S,).

  Raises:
    MalformedReport, StepMismatch, StructureMismatch, ShapeMismatch,
    DtypeMismatch, NonFiniteReport (the loss): each with the step and the
    leaf path.
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
  loss = _validate_loss(report.loss, step) if num_shards == 1 else _validate_losses(
      report.loss, step, num_shards)

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

  arrays, paths = [], []
  for (path, p), (_, g) in zip(param_leaves, grad_leaves):
    where = _path_str(path)
    if not isinstance(g, (jax.Array, np.ndarray)):
      raise errors.MalformedReport(
          f"step {step}: gradient leaf {where} is a {type(g).__name__}, not an array",
          step=step, where=where,
      )
    want = tuple(p.shape) if num_shards == 1 or aggregate else (num_shards, *p.shape)
    if tuple(g.shape) != want:
      axis = ("" if num_shards == 1 or aggregate else
              f" (a leading shard axis of num_shards={num_shards}, then the parameter's shape "
              f"{tuple(p.shape)})")
      raise errors.ShapeMismatch(
          f"step {step}: gradient leaf {where} has shape {tuple(g.shape)}, "
          + (f"the parameter has shape {tuple(p.shape)}" if num_shards == 1 else
             f"the parameter has shape {tuple(p.shape)} (an aggregate report carries the mean of "
             f"the {num_shards} shards, without a shard axis)" if aggregate else
             f"expected {want}{axis}"),
          step=step, where=where,
      )
    if g.dtype != p.dtype:
      raise errors.DtypeMismatch(
          f"step {step}: gradient leaf {where} has dtype {g.dtype}, the parameter has {p.dtype}",
          step=step, where=where,
      )
    arrays.append(g)
    paths.append(where)
  return arrays, paths, loss


def validate_report(
    report: object, *, step: int, params: Params, num_shards: int = 1, aggregate: bool = False
) -> tuple[list[np.ndarray], np.float32 | np.ndarray]:
  """Checks a report's form and values; returns host copies of its leaves.

  What `receive_report` and `digest_received` check, without a device: for
  storing a report and for tests.

  Returns:
    The gradient leaves as host numpy arrays (copies) in the parameters' tree
    order, and the loss as a float32 scalar.

  Raises:
    MalformedReport, StepMismatch, StructureMismatch, ShapeMismatch,
    DtypeMismatch, NonFiniteReport: each with the step and the leaf path.
  """
  arrays, paths, loss = _check_form(report, step=step, params=params, num_shards=num_shards,
                                    aggregate=aggregate)
  host = [np.array(jax.device_get(g), order="C", copy=True) for g in arrays]
  for where, h in zip(paths, host):
    if num_shards == 1 or aggregate:
      _check_finite(h.reshape(-1), step, where)
    else:
      for s in range(num_shards):
        _check_finite(h[s].reshape(-1), step, where, shard=s)
  return host, loss


@dataclasses.dataclass(frozen=True)
class ReceivedReport:
  """A report whose form was checked, copied into trusted memory.

  Attributes:
    step: the step it is for.
    leaves: the gradient leaves on the trusted device (the runtime's own
      copies), in the parameters' tree order.
    paths: each leaf's path (for messages).
    loss: the reported loss (float32; shape (S,) for S > 1 shards).
    num_shards: S when every leaf has a leading shard axis of size S; 1
      otherwise (an ``"aggregate"`` report, whose `loss` still has S entries).
  """

  step: int
  leaves: list[jax.Array]
  paths: list[str]
  loss: np.float32 | np.ndarray
  num_shards: int = 1


def receive_report(report: object, *, step: int, params: Params, device: jax.Device,
                   num_shards: int = 1, aggregate: bool = False) -> ReceivedReport:
  """Checks the report's form (with S = `num_shards` shards and `aggregate`,
  see `_check_form`), then copies its leaves to `device`.

  The copy is one batched transfer that is not waited for (`digest_received`
  reads each leaf as it lands). It is always a copy, even of arrays already on
  `device`: the runtime keeps no reference to a worker's buffer.

  Raises:
    MalformedReport, StepMismatch, StructureMismatch, ShapeMismatch,
    DtypeMismatch: each with the step and the leaf path; nothing was copied.
  """
  arrays, paths, loss = _check_form(report, step=step, params=params, num_shards=num_shards,
                                    aggregate=aggregate)
  return ReceivedReport(step=step, leaves=copy_to(arrays, device), paths=paths, loss=loss,
                        num_shards=1 if aggregate else num_shards)


def copy_to(arrays: list, device: jax.Device) -> list[jax.Array]:
  """Copies of `arrays` (numpy or jax, on any device) on `device`, in one
  batched transfer that is not waited for; never an alias of the inputs.

  A numpy array is copied on the host first: on a CPU device jax may use an
  aligned numpy buffer in place (zero-copy) even with ``may_alias=False``
  (jax 0.10), and the worker could then change it after the check. A jax
  array already on `device` is copied too (``may_alias=False``).
  """
  own = [np.array(a, order="C", copy=True) if isinstance(a, np.ndarray) else a for a in arrays]
  n = len(own)
  return jax.device_put(own, [device] * n, may_alias=[False] * n)


def digest_received(received: ReceivedReport, *, name: str = DEFAULT_DIGEST) -> bytes:
  """The report digest of a received report (hashing the trusted copies, each
  leaf as soon as its transfer lands). Equal to `report_digest` of the same
  leaves. Finiteness is checked by the update (`check_finite`)."""
  h = _hasher(name, received.step, received.loss,
              sum(leaf.size * leaf.dtype.itemsize for leaf in received.leaves))
  for leaf in received.leaves:
    # Zero-copy on a CPU device; waits for this leaf only. One update per leaf:
    # BLAKE3's threads pay off only on large inputs.
    h.update(memoryview(_encode(h, np.asarray(leaf))).cast("B"))
  return h.digest()


def check_finite(received: ReceivedReport, finite: np.ndarray) -> None:
  """Raises `NonFiniteReport` for the first leaf whose flag in `finite` (one
  bool per leaf, from the update's reads; with S > 1 shards one row of S
  bools per leaf) is False, with its count of NaN/Inf (and its shard)."""
  if finite.all():
    return
  if received.num_shards == 1:
    i = int(np.argmin(finite))
    _check_finite(np.asarray(received.leaves[i]).reshape(-1), received.step, received.paths[i])
    raise AssertionError(f"leaf {received.paths[i]} was flagged non-finite but holds no NaN/Inf")
  i, s = (int(v) for v in np.argwhere(~finite)[0])  # The first leaf, then its first shard.
  _check_finite(np.asarray(received.leaves[i])[s].reshape(-1), received.step, received.paths[i],
                shard=s)
  raise AssertionError(f"leaf {received.paths[i]} shard {s} was flagged non-finite but holds no NaN/Inf")


def _inexact(dtype: np.dtype) -> bool:
  """Floating or complex, numpy's or ml_dtypes' (bfloat16, float8...)."""
  return bool(jax.dtypes.issubdtype(dtype, np.inexact))


def count_nonfinite(values: np.ndarray) -> int:
  """How many NaN/Inf `values` holds (0 for an integer dtype): one summing pass
  when there are none, since a finite sum means every value is finite."""
  if not _inexact(values.dtype):
    return 0
  with np.errstate(over="ignore", invalid="ignore"):
    if np.isfinite(np.add.reduce(values, axis=None)):
      return 0
  return int(values.size - np.count_nonzero(np.isfinite(values)))  # NaN/Inf, or the sum overflowed.


def _check_finite(values: np.ndarray, step: int, where: str, shard: int | None = None) -> None:
  bad = count_nonfinite(values)
  if bad:
    of = "" if shard is None else f" of shard {shard}"
    raise errors.NonFiniteReport(
        f"step {step}: gradient leaf {where}{of} holds {bad} NaN/Inf value(s)", step=step,
        where=where, shard=shard,
    )


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


def _validate_losses(loss: object, step: int, num_shards: int) -> np.ndarray:
  """The losses of a report of `num_shards` shards: a real array of shape (S,),
  each finite; returned as float32."""
  if isinstance(loss, (bool, np.bool_)) or not isinstance(loss, (np.ndarray, jax.Array)):
    raise errors.MalformedReport(
        f"step {step}: loss is a {type(loss).__name__}, expected an array of {num_shards} shard "
        "losses", step=step, where="loss")
  value = np.asarray(jax.device_get(loss))
  if value.shape != (num_shards,) or value.dtype.kind not in "fiu":
    raise errors.MalformedReport(
        f"step {step}: loss must be a real array of shape ({num_shards},) (one per shard), got "
        f"shape {value.shape} dtype {value.dtype}", step=step, where="loss")
  value = value.astype(np.float32)
  bad = np.flatnonzero(~np.isfinite(value))
  if bad.size:
    s = int(bad[0])
    raise errors.NonFiniteReport(f"step {step}: loss of shard {s} is {value[s]}", step=step,
                                 where="loss", shard=s)
  return value


def report_digest(step: int, leaves: list[np.ndarray], loss: np.float32 | np.ndarray, *,
                  name: str = LEGACY_DIGEST) -> bytes:
  """The report digest (hash function `name`) of the report's canonical bytes:
  domain, step, loss, then each leaf's dtype, shape and little-endian bytes in
  the parameters' tree order. Equal to `digest_received` of the same report."""
  h = _hasher(name, step, loss)
  hash_leaves(h, leaves)
  return h.digest()


def _hasher(name: str, step: int, loss: np.float32, nbytes: int = THREADED_BYTES):
  if name == "blake3":  # (The digest does not depend on the number of threads.)
    h = blake3.blake3(DIGEST_DOMAIN, max_threads=blake3.blake3.AUTO if nbytes >= THREADED_BYTES else 1)
  elif name == "sha256":
    h = hashlib.sha256(DIGEST_DOMAIN)
  else:
    raise ValueError(f"unknown report digest {name!r}; expected one of {DIGEST_NAMES}")
  h.update(step.to_bytes(8, "big"))
  h.update(np.asarray(loss, "<f4").tobytes())
  return h


def _encode(h, leaf) -> np.ndarray:
  """Feeds the leaf's dtype and shape into `h`; returns its values as a flat
  little-endian array (no copy when the leaf is one already) to hash next."""
  leaf = np.ascontiguousarray(leaf)  # (A 0-d leaf encodes as shape (1,).)
  h.update(f"{leaf.dtype.str}{leaf.shape}".encode())
  return leaf.astype(leaf.dtype.newbyteorder("<"), copy=False).reshape(-1)


def hash_leaves(h, leaves) -> None:
  """Feeds each host array's dtype, shape and little-endian bytes into hash `h`
  (the canonical leaf encoding of report and parameter digests)."""
  for leaf in leaves:
    h.update(memoryview(_encode(h, leaf)).cast("B"))


def report_mac(mac_key: bytes, digest: bytes) -> bytes:
  """HMAC-SHA256 of a report digest under the runtime's MAC key."""
  return hmac.new(mac_key, digest, hashlib.sha256).digest()
