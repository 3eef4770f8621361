"""The persisted transcript: hash-chained, signed JSON lines (docs/design.md section 6).

One record per line, in canonical JSON (sorted keys, no spaces)::

  {"body": {...}, "hash": H, "prev": H_prev, "seq": i, "sig": S, "type": T}

* ``hash = SHA-256(canonical({"body", "prev", "seq", "type"}))``; ``prev`` is
  the previous record's hash (64 zeros for the first), so no record can be
  removed, duplicated, reordered or changed without breaking the chain.
* ``sig`` is the trusted runtime's Ed25519 signature of the hash bytes. The
  public key is in the first record (type "header"): an auditor needs only it.
* Types: "header", "step" and "check" (the runtime's `TranscriptEntry`s),
  "report" and "checkpoint" (SHA-256 of a file written to the run directory),
  "resume" (the run continued from a checkpoint) and "close" (the final
  parameter digest).

`TranscriptWriter` appends one flushed and fsynced line per record (a crash
loses at most the record being written); it is the runtime's `Recorder`.
`read_transcript` parses and verifies every line and names the first bad one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ginn_jax._src.errors import GinnError
from ginn_jax._src.trusted.runtime import TranscriptEntry

GENESIS = "0" * 64
RECORD_TYPES = ("header", "step", "check", "report", "checkpoint", "resume", "close")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX128 = re.compile(r"[0-9a-f]{128}")
_FIELDS = {"body", "hash", "prev", "seq", "sig", "type"}


class TranscriptError(GinnError, ValueError):
  """A run-directory file is damaged, forged or inconsistent.

  Attributes:
    file: the file the problem was found in.
    entry: 1-based line (record) number in the transcript, if any.
    step: the training step concerned, if any.
  """

  def __init__(self, message: str, *, file: str, entry: int | None = None, step: int | None = None):
    where = file + (f": entry {entry}" if entry is not None else "")
    where += f" (step {step})" if step is not None else ""
    super().__init__(f"{where}: {message}")
    self.file = file
    self.entry = entry
    self.step = step


def canonical(obj: Any) -> bytes:
  """The one byte encoding of a JSON value that is hashed and written."""
  return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def record_hash(seq: int, type_: str, body: dict[str, Any], prev: str) -> str:
  """SHA-256 (hex) of a record's content and its link to the previous record."""
  return hashlib.sha256(canonical({"body": body, "prev": prev, "seq": seq, "type": type_})).hexdigest()


@dataclasses.dataclass(frozen=True)
class Record:
  """One verified transcript line.

  Attributes:
    seq: position in the chain (0 for the header).
    type: one of `RECORD_TYPES`.
    body: the record's content.
    prev, hash, sig: chain link, own hash, signature (hex).
    line: 1-based line number in the file.
    end: byte offset just after the line's newline.
  """

  seq: int
  type: str
  body: dict[str, Any]
  prev: str
  hash: str
  sig: str
  line: int
  end: int


def public_key_hex(signing_seed: bytes) -> str:
  """Raw Ed25519 public key (hex) of a 32-byte signing seed."""
  return Ed25519PrivateKey.from_private_bytes(signing_seed).public_key().public_bytes_raw().hex()


class TranscriptWriter:
  """Appends signed, chained records to a transcript file; the runtime's recorder.

  Use `create` for a new run and `resume` to continue a verified prefix.

  Args:
    path: the transcript file (opened for appending).
    signing_seed: 32-byte Ed25519 seed (``TrustedRuntime.signing_seed()``).
    seq, prev: the next record's position and the last record's hash.
    fsync: fsync after every record (a power loss then loses at most one).
  """

  def __init__(self, path: str | os.PathLike, signing_seed: bytes, *, seq: int, prev: str,
               fsync: bool = True):
    self.path = os.fspath(path)
    self._key = Ed25519PrivateKey.from_private_bytes(signing_seed)
    self.seq = seq
    self.prev = prev
    self.fsync = fsync
    self._file = open(self.path, "ab")

  @classmethod
  def create(cls, path: str | os.PathLike, header: dict[str, Any], signing_seed: bytes,
             **kw) -> "TranscriptWriter":
    """Starts a new transcript whose first record is `header`.

    Raises:
      FileExistsError: the file already exists (resume it instead).
    """
    with open(path, "xb"):
      pass
    writer = cls(path, signing_seed, seq=0, prev=GENESIS, **kw)
    writer.append("header", header)
    return writer

  @classmethod
  def resume(cls, path: str | os.PathLike, last: Record, signing_seed: bytes, **kw) -> "TranscriptWriter":
    """Cuts the file just after the verified record `last` and appends after it."""
    with open(path, "r+b") as f:
      f.truncate(last.end)
      f.flush()
      os.fsync(f.fileno())
    return cls(path, signing_seed, seq=last.seq + 1, prev=last.hash, **kw)

  def append(self, type_: str, body: dict[str, Any]) -> Record:
    """Signs, writes and flushes one record; returns it."""
    if type_ not in RECORD_TYPES:
      raise ValueError(f"unknown transcript record type {type_!r}")
    h = record_hash(self.seq, type_, body, self.prev)
    sig = self._key.sign(bytes.fromhex(h)).hex()
    obj = {"body": body, "hash": h, "prev": self.prev, "seq": self.seq, "sig": sig, "type": type_}
    self._file.write(canonical(obj) + b"\n")
    self._file.flush()
    if self.fsync:
      os.fsync(self._file.fileno())
    rec = Record(self.seq, type_, body, self.prev, h, sig, line=self.seq + 1, end=self._file.tell())
    self.seq, self.prev = self.seq + 1, h
    return rec

  def record(self, entry: TranscriptEntry) -> None:
    """The runtime's `Recorder` hook: persists a "step" or "check" entry."""
    body = dataclasses.asdict(entry)
    for field in ("shards", "witness_shards", "projections_digest"):  # Records as before they existed.
      if body[field] is None:
        del body[field]
    self.append(body.pop("kind"), body)

  def close(self) -> None:
    self._file.close()


def entry_of(record: Record) -> TranscriptEntry:
  """The runtime's `TranscriptEntry` of a "step" or "check" record."""
  return TranscriptEntry(kind=record.type, **record.body)


def read_transcript(path: str | os.PathLike, *, public_key: str | None = None,
                    allow_torn_tail: bool = False) -> list[Record]:
  """Reads a transcript and verifies its form, chain and signatures.

  Checks that every line is canonical JSON with exactly the record fields,
  that ``seq`` counts 0, 1, 2, ..., that each ``prev`` is the previous hash,
  that each hash matches its content, and that each signature verifies under
  the header's public key (which must equal `public_key` when given). What a
  record *means* (steps in order, a closing record) is checked by the auditor.

  Args:
    path: the transcript file.
    public_key: the expected public key (hex), obtained out of band.
    allow_torn_tail: accept (and drop) a damaged last line: what a crash in
      the middle of a write leaves (used by resume, never by the auditor).

  Returns:
    The verified records in order.

  Raises:
    TranscriptError: naming the file and the first bad line.
  """
  name = os.fspath(path)
  with open(name, "rb") as f:
    data = f.read()
  records: list[Record] = []
  verifier: Ed25519PublicKey | None = None
  offset, lines = 0, data.split(b"\n")
  for i, raw in enumerate(lines):
    is_last = i == len(lines) - 1
    if is_last and raw == b"":
      break
    end = offset + len(raw) + 1
    try:
      if is_last:  # Every record ends with a newline: this one was cut off.
        raise TranscriptError("line is not terminated (torn write)", file=name, entry=i + 1)
      rec = _parse(raw, i, name, end)
      if records and rec.prev != records[-1].hash or not records and rec.prev != GENESIS:
        raise TranscriptError("chain broken: prev does not match the previous record's hash "
                              "(a record was removed, inserted or reordered)", file=name, entry=i + 1)
      if i == 0:
        verifier = _header_key(rec, name, public_key)
      try:
        verifier.verify(bytes.fromhex(rec.sig), bytes.fromhex(rec.hash))
      except (InvalidSignature, ValueError):
        raise TranscriptError("signature does not verify under the run's public key",
                              file=name, entry=i + 1) from None
    except TranscriptError:
      if allow_torn_tail and is_last and records:
        break
      raise
    records.append(rec)
    offset = end
  if not records:
    raise TranscriptError("empty transcript (no header)", file=name, entry=1)
  return records


def _parse(raw: bytes, i: int, name: str, end: int) -> Record:
  try:
    obj = json.loads(raw.decode("ascii"))
  except (UnicodeDecodeError, ValueError) as e:
    raise TranscriptError(f"not a JSON record ({e})", file=name, entry=i + 1) from None
  if not isinstance(obj, dict) or set(obj) != _FIELDS:
    raise TranscriptError(f"record must have exactly the fields {sorted(_FIELDS)}", file=name, entry=i + 1)
  if canonical(obj) != raw:
    raise TranscriptError("record is not in canonical form (bytes were altered)", file=name, entry=i + 1)
  seq, type_, body, prev, h, sig = (obj[k] for k in ("seq", "type", "body", "prev", "hash", "sig"))
  if not isinstance(seq, int) or isinstance(seq, bool) or seq != i:
    raise TranscriptError(f"sequence number {seq!r} where {i} was expected (a record was removed, "
                          "duplicated or reordered)", file=name, entry=i + 1)
  if type_ not in RECORD_TYPES or not isinstance(body, dict):
    raise TranscriptError(f"unknown record type {type_!r} or body not an object", file=name, entry=i + 1)
  if (i == 0) != (type_ == "header"):
    raise TranscriptError("the header must be the first record and only the first", file=name, entry=i + 1)
  if not (all(isinstance(x, str) and _HEX64.fullmatch(x) for x in (prev, h))
          and isinstance(sig, str) and _HEX128.fullmatch(sig)):
    raise TranscriptError("prev, hash and sig must be lowercase hex of 32, 32 and 64 bytes",
                          file=name, entry=i + 1)
  if record_hash(seq, type_, body, prev) != h:
    raise TranscriptError("hash does not match the record's content (the record was changed)",
                          file=name, entry=i + 1, step=body.get("step"))
  return Record(seq, type_, body, prev, h, sig, line=i + 1, end=end)


def _header_key(rec: Record, name: str, expected: str | None) -> Ed25519PublicKey:
  key = rec.body.get("public_key")
  if expected is not None and key != expected:
    raise TranscriptError(f"header public key {key!r} is not the expected key {expected!r}",
                          file=name, entry=1)
  try:
    return Ed25519PublicKey.from_public_bytes(bytes.fromhex(key))
  except (TypeError, ValueError):
    raise TranscriptError("header has no valid Ed25519 public key", file=name, entry=1) from None
