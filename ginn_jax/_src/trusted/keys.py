"""Randomness of the trusted runtime (docs/design.md section 3).

Two roots, never mixed:

* the public **training seed**: init, data-order and layer keys, each a
  `fold_in` of the seed key with a fixed stream constant; the key of step t is
  ``fold_in(stream_key, t)``; batch indices of step t come from the per-epoch
  permutation ``permutation(fold_in(data_key, epoch), N)``.
* the private **audit secret**: the MAC key and the verification coin, derived
  with HMAC-SHA256. Nothing derived from it leaves the trusted runtime.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import hmac
import os

import jax
import numpy as np

from ginn_jax._src.devices import trusted_device

INIT_STREAM = 1
DATA_STREAM = 2
LAYER_STREAM = 3


@dataclasses.dataclass(frozen=True)
class SeedStreams:
  """The three public key streams of a training seed (typed threefry keys)."""

  init_key: jax.Array
  data_key: jax.Array
  layer_key: jax.Array


def _on_trusted(n: int) -> jax.Array:
  """A uint32 scalar put explicitly on the trusted device."""
  if not 0 <= n < 2**32:
    raise ValueError(f"seeds, steps and epochs must be in [0, 2**32), got {n}")
  return jax.device_put(np.uint32(n), trusted_device())


_fold_in = jax.jit(jax.random.fold_in)


@jax.jit
def _streams(seed: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  root = jax.random.key(seed, impl="threefry2x32")
  return tuple(jax.random.fold_in(root, s) for s in (INIT_STREAM, DATA_STREAM, LAYER_STREAM))


def seed_streams(seed: int) -> SeedStreams:
  """Derives the init, data-order and layer streams from the public seed,
  on the trusted device."""
  init_key, data_key, layer_key_ = _streams(_on_trusted(seed))
  return SeedStreams(init_key=init_key, data_key=data_key, layer_key=layer_key_)


def fold_in(key: jax.Array, n: int) -> jax.Array:
  """``jax.random.fold_in(key, n)`` on the trusted device, with `n` transferred explicitly."""
  return _fold_in(key, _on_trusted(n))


def layer_key(streams: SeedStreams, step: int) -> jax.Array:
  """The layer-randomness key of `step`: ``fold_in(layer_stream, step)``."""
  return fold_in(streams.layer_key, step)


@functools.partial(jax.jit, static_argnums=1)
def _permutation(key: jax.Array, n: int) -> jax.Array:
  return jax.random.permutation(key, n)


class BatchSchedule:
  """Batch indices of every step: epoch e is ``permutation(fold_in(data_key, e), N)``
  cut into ``N // batch_size`` batches (the last partial batch is dropped).

  Keeps the permutation of the current epoch only: O(N) memory at any step.
  """

  def __init__(self, data_key: jax.Array, num_examples: int, batch_size: int):
    if not 0 < batch_size <= num_examples:
      raise ValueError(
          f"batch_size={batch_size} must be in [1, {num_examples}] (the training set size)"
      )
    self.data_key = data_key
    self.num_examples = num_examples
    self.batch_size = batch_size
    self.steps_per_epoch = num_examples // batch_size
    self._epoch = -1
    self._perm: np.ndarray | None = None

  def epoch_permutation(self, epoch: int) -> np.ndarray:
    perm = _permutation(fold_in(self.data_key, epoch), self.num_examples)
    return np.asarray(jax.device_get(perm), dtype=np.int32)

  def indices(self, step: int) -> np.ndarray:
    """The int32 batch indices of `step` (read-only)."""
    epoch, pos = divmod(step, self.steps_per_epoch)
    if epoch != self._epoch:
      self._perm = self.epoch_permutation(epoch)
      self._perm.flags.writeable = False
      self._epoch = epoch
    return self._perm[pos * self.batch_size:(pos + 1) * self.batch_size]


@dataclasses.dataclass(frozen=True)
class AuditKeys:
  """Keys derived from the audit secret. Never sent to the worker; `repr`
  shows nothing of them."""

  mac_key: bytes = dataclasses.field(repr=False)
  coin_key: bytes = dataclasses.field(repr=False)
  storage_key: bytes = dataclasses.field(repr=False)
  signing_seed: bytes = dataclasses.field(repr=False)
  freivalds_key: bytes = dataclasses.field(repr=False)
  projection_key: bytes = dataclasses.field(repr=False)


def new_audit_secret() -> bytes:
  """32 random bytes from the OS."""
  return os.urandom(32)


def audit_keys(secret: bytes) -> AuditKeys:
  """Derives the MAC and coin keys from the audit secret (HMAC-SHA256 as a KDF)."""
  if not isinstance(secret, (bytes, bytearray)) or len(secret) < 16:
    raise ValueError("the audit secret must be at least 16 bytes (32 random bytes by default)")
  derive = lambda label: hmac.new(bytes(secret), label, hashlib.sha256).digest()
  return AuditKeys(mac_key=derive(b"ginn_jax/mac-key/v1"), coin_key=derive(b"ginn_jax/coin-key/v1"),
                   storage_key=derive(b"ginn_jax/storage-key/v1"),
                   signing_seed=derive(b"ginn_jax/ed25519-seed/v1"),
                   freivalds_key=derive(b"ginn_jax/freivalds-key/v1"),
                   projection_key=derive(b"ginn_jax/projection-key/v1"))


def storage_mac(keys: AuditKeys, data: bytes, *, label: bytes) -> bytes:
  """HMAC-SHA256 of ``label || 0x00 || data`` under the storage key: the MAC of
  files the runtime writes to untrusted storage and reads back."""
  return hmac.new(keys.storage_key, label + b"\x00" + data, hashlib.sha256).digest()


def verification_coin(keys: AuditKeys, step: int, report_digest: bytes, p: float) -> bool:
  """The secret coin of `step`: True with probability `p`.

  The coin is a PRF of the coin key, the step and the committed report digest,
  so it can only be drawn after the report is committed, and a worker without
  the key cannot predict it.
  """
  return _coin(keys, b"ginn_jax/coin/v1", step, report_digest, p)


def witness_coin(keys: AuditKeys, step: int, report_digest: bytes, p_witness: float) -> bool:
  """The secret witness-check coin of `step`: True with probability `p_witness`,
  independent of `verification_coin` (another PRF domain, same key)."""
  return _coin(keys, b"ginn_jax/witness-coin/v1", step, report_digest, p_witness)


def _coin(keys: AuditKeys, domain: bytes, step: int, report_digest: bytes, p: float) -> bool:
  msg = domain + step.to_bytes(8, "big") + report_digest
  u = int.from_bytes(hmac.new(keys.coin_key, msg, hashlib.sha256).digest()[:8], "big")
  # u / 2**64 < p, compared exactly (an int against a float scaled by a power of
  # two): p = 1 is always True and p = 0 always False, whatever the digest (the
  # float quotient of a u near 2**64 would round up to 1.0).
  return u < p * 2.0**64


def shard_verification_coins(keys: AuditKeys, step: int, report_digest: bytes, p: float,
                             num_shards: int) -> tuple[bool, ...]:
  """The re-computation coins of the `num_shards` shards of `step`: one
  independent coin with probability `p` per shard, a PRF of the coin key, the
  step, the shard index and the committed digest (its own domain). With one
  shard it is `verification_coin` itself, so runs without shards draw exactly
  the coins they always did."""
  if num_shards == 1:
    return (verification_coin(keys, step, report_digest, p),)
  return tuple(_coin(keys, b"ginn_jax/shard-coin/v1", step, s.to_bytes(4, "big") + report_digest, p)
               for s in range(num_shards))


def shard_witness_coins(keys: AuditKeys, step: int, report_digest: bytes, p_witness: float,
                        num_shards: int) -> tuple[bool, ...]:
  """The witness-check coins of the shards of `step` (as
  `shard_verification_coins`, in another domain); `witness_coin` for one shard."""
  if num_shards == 1:
    return (witness_coin(keys, step, report_digest, p_witness),)
  return tuple(_coin(keys, b"ginn_jax/shard-witness-coin/v1", step,
                     s.to_bytes(4, "big") + report_digest, p_witness) for s in range(num_shards))


def projection_seed(keys: AuditKeys, step: int, report_digest: bytes) -> np.ndarray:
  """The threefry key data (2 uint32) of `step`'s projection vectors in an
  ``"aggregate"`` run: a PRF of the projection key, the step and the committed
  report digest, so the vectors exist only after the mean is committed."""
  msg = b"ginn_jax/projection/v1" + step.to_bytes(8, "big") + report_digest
  return np.frombuffer(hmac.new(keys.projection_key, msg, hashlib.sha256).digest()[:8], ">u4").astype(
      np.uint32)

