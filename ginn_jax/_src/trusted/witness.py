"""The witness of a step: its form, its validation and its digest.

docs/design.md sections 10 and 12. For a step drawn for a witness check the
worker answers a `WitnessRequest` with a `Witness`: the output of every
witnessed product of the step's gradient program, in the order of the run's
witness plan (`ginn_jax._src.program`). This module

* gives the form a witness must have (`WitnessSpec`, from the plan);
* validates it (`validate_witness`: structure, shapes, dtypes, finite);
* hashes it (`witness_digest`, BLAKE3) and derives the secret Gaussian vectors' seed from the
  audit secret, the step and that digest (`freivalds_seed`), so they are
  fixed only after the witness is.

The check itself (substitution and Freivalds) is in `program_check`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import hmac

import blake3
import jax
import numpy as np

from ginn_jax._src import errors
from ginn_jax._src.boundary import Witness
from ginn_jax._src.trusted import commit

DIGEST_DOMAIN = b"ginn_jax/witness/v1"


@dataclasses.dataclass(frozen=True)
class WitnessSpec:
  """The form a step's witness must have (from the run's witness plan).

  Attributes:
    outputs: (shape, dtype) of each witnessed product's output, in plan order.
    input_grads: must be empty (a field of the message kept for its form).
    names: each witnessed product's description (primitive, position in the
      plan, shapes).
  """

  outputs: tuple[tuple[tuple[int, ...], np.dtype], ...]
  input_grads: tuple[tuple[tuple[int, ...], np.dtype], ...]
  names: tuple[str, ...]

  @classmethod
  def of_plan(cls, plan) -> "WitnessSpec":
    w = plan.witnessed
    return cls(outputs=tuple((tuple(p.out[0]), np.dtype(p.out[1])) for p in w), input_grads=(),
               names=tuple(p.describe() for p in w))

  @property
  def nbytes(self) -> int:
    return int(sum(np.prod(s) * d.itemsize for s, d in (*self.outputs, *self.input_grads)))


def _violation(step: int, where: str, reason: str) -> errors.WitnessViolation:
  return errors.WitnessViolation(step=step, leaf=where, reason=reason)


def validate_witness(witness: object, *, step: int, spec: WitnessSpec,
                     device: jax.Device | None = None) -> tuple[list, list]:
  """Checks a witness's form and values; returns trusted copies of its outputs
  and input gradients.

  The arrays are first copied into trusted memory (to `device`, in one batched
  transfer; or to host numpy arrays when `device` is None) and only the copies
  are checked, so a worker that changes its buffers meanwhile or afterwards
  cannot change what was checked, hashed and used.

  Raises:
    WitnessViolation: the witness is missing, for another step, has a missing
      or extra layer, a wrong shape or dtype, or a NaN/Inf (the report is
      already committed, so a bad witness is a violation, not a rejection).
  """
  if not isinstance(witness, Witness):
    raise _violation(step, "witness", f"expected a Witness, got {type(witness).__name__}")
  s = witness.step
  if isinstance(s, (bool, np.bool_)) or not isinstance(s, (int, np.integer)) or s != step:
    raise _violation(step, "witness.step", f"the witness is for step {s!r}, not {step}")
  arrays, places = [], []
  for field, want in (("outputs", spec.outputs), ("input_grads", spec.input_grads)):
    got = getattr(witness, field)
    if not isinstance(got, (list, tuple)) or len(got) != len(want):
      n = len(got) if isinstance(got, (list, tuple)) else type(got).__name__
      raise _violation(step, f"witness.{field}",
                       f"expected {len(want)} arrays (one per witnessed product of the run's "
                       f"witness plan, in plan order), got {n}" if field == "outputs" else
                       f"expected {len(want)} arrays, got {n}")
    for i, (a, (shape, dtype)) in enumerate(zip(got, want)):
      where = f"witness.{field}[{i}] ({spec.names[i]})"
      if not isinstance(a, (jax.Array, np.ndarray)):
        raise _violation(step, where, f"is a {type(a).__name__}, not an array")
      if tuple(a.shape) != shape:
        raise _violation(step, where, f"has shape {tuple(a.shape)}, expected {shape}")
      if a.dtype != dtype:
        raise _violation(step, where, f"has dtype {a.dtype}, expected {dtype}")
      arrays.append(a)
      places.append(where)
  if device is None:
    copies = [np.array(jax.device_get(a), order="C", copy=True) for a in arrays]
  else:
    copies = commit.copy_to(arrays, device)
  for where, c in zip(places, copies):
    bad = commit.count_nonfinite(np.asarray(c))  # A zero-copy view on a CPU device.
    if bad:
      raise _violation(step, where, f"holds {bad} NaN/Inf value(s)")
  n = len(spec.outputs)
  return list(copies[:n]), list(copies[n:])


# The witness digest's hash function, recorded in the run's header. BLAKE3 on all
# cores: a witness is ~100 MiB for VGG-11, and SHA-256 (1.5 GB/s here) alone
# took a third of the check; BLAKE3 hashes the same bytes about 3x faster.
DIGEST_NAME = "blake3"


def witness_digest(step: int, report_digest: bytes, outputs, input_grads,
                   shard: int | None = None) -> bytes:
  """BLAKE3 (32 bytes) of the witness, bound to the step and the committed report:
  the domain, the step, the report digest, (with shards: the shard index as 4
  big-endian bytes,) then each array's dtype, shape and little-endian bytes
  (outputs, then input gradients, in layer order)."""
  h = blake3.blake3(DIGEST_DOMAIN, max_threads=blake3.blake3.AUTO)
  h.update(step.to_bytes(8, "big"))
  h.update(report_digest)
  if shard is not None:
    h.update(shard.to_bytes(4, "big"))
  commit.hash_leaves(h, [*outputs, *input_grads])
  return h.digest()


def freivalds_seed(key: bytes, step: int, digest: bytes) -> np.ndarray:
  """The threefry key data of the step's secret Gaussian vectors: a PRF of the
  audit secret's witness key, the step and the witness digest."""
  mac = hmac.new(key, b"ginn_jax/freivalds/v1" + step.to_bytes(8, "big") + digest,
                 hashlib.sha256).digest()
  return np.frombuffer(mac[:8], dtype=">u4").astype(np.uint32)
