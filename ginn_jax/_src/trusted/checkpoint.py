"""Authenticated files in the run directory: checkpoints and kept reports.

Both use one format, a "blob"::

  b"GINNBLOB1\\n" | HMAC-SHA256 (32 bytes) | payload (numpy .npz, no pickles)

The HMAC is ``TrustedRuntime.authenticate(payload, label=...)`` (needs the
audit secret) and is checked on every load by the runtime. The file's SHA-256
also goes into a signed transcript record, so a public auditor (no secret)
checks every byte of it too. Files are written atomically: a temp file in the
same folder, fsync, ``os.replace``, fsync of the folder; a crash leaves either
the old file or the new one, never half of one.

A checkpoint holds the leaves of ``(params, opt_state)`` in tree order plus a
JSON ``__meta__`` (step, verified count, tree structure, leaf dtypes and
shapes), checked against a template state from the model before use.
"""
from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import tempfile
import zipfile
from typing import Any, Callable

import jax
import numpy as np

from ginn_jax._src.trusted import commit
from ginn_jax._src.trusted.runtime import TrainState
from ginn_jax._src.trusted.transcript import TranscriptError

MAGIC = b"GINNBLOB1\n"
CHECKPOINT_LABEL = b"ginn_jax/checkpoint/v1"
REPORT_LABEL = b"ginn_jax/report-file/v1"
Authenticate = Callable[..., bytes]
"""``authenticate(data, label=...) -> 32-byte MAC`` (``TrustedRuntime.authenticate``)."""


def sha256_hex(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def tree_digest(tree: Any) -> str:
  """SHA-256 (hex) of every leaf's dtype, shape and little-endian bytes, in tree order."""
  h = hashlib.sha256(b"ginn_jax/tree/v1")
  commit.hash_leaves(h, (np.asarray(x) for x in jax.device_get(jax.tree_util.tree_leaves(tree))))
  return h.hexdigest()


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
  """Writes `data` to `path` so that a crash leaves the old file or the new one."""
  path = os.fspath(path)
  folder = os.path.dirname(path) or "."
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  dfd = os.open(folder, os.O_RDONLY)
  try:
    os.fsync(dfd)
  finally:
    os.close(dfd)


def encode_blob(arrays: list[np.ndarray], meta: dict[str, Any], *, label: bytes,
                authenticate: Authenticate) -> bytes:
  """The file bytes of `arrays` (as ``a0, a1, ...``) and `meta`, with their MAC."""
  buf = io.BytesIO()
  named = {f"a{i}": np.asarray(a) for i, a in enumerate(arrays)}
  named["__meta__"] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)
  np.savez(buf, **named)
  payload = buf.getvalue()
  return MAGIC + authenticate(payload, label=label) + payload


def decode_blob(data: bytes, *, file: str, label: bytes, expected_sha256: str | None = None,
                authenticate: Authenticate | None = None) -> tuple[list[np.ndarray], dict[str, Any]]:
  """Checks and parses blob bytes.

  Args:
    data: the file's bytes.
    file: its name (for errors).
    label: the MAC label it was written with.
    expected_sha256: the digest from the signed transcript (public check).
    authenticate: the runtime's MAC function (check needing the secret).

  Returns:
    The arrays in order and the metadata.

  Raises:
    TranscriptError: naming `file` and what is wrong with it.
  """
  if expected_sha256 is not None and sha256_hex(data) != expected_sha256:
    raise TranscriptError("SHA-256 differs from the signed transcript record (file altered)", file=file)
  if len(data) < len(MAGIC) + 32 or not data.startswith(MAGIC):
    raise TranscriptError("not a ginn_jax blob file (bad magic or too short)", file=file)
  tag, payload = data[len(MAGIC):len(MAGIC) + 32], data[len(MAGIC) + 32:]
  if authenticate is not None and not hmac.compare_digest(tag, authenticate(payload, label=label)):
    raise TranscriptError("MAC does not verify (file altered or written under another secret)",
                          file=file)
  try:
    with np.load(io.BytesIO(payload), allow_pickle=False) as z:
      named = {k: z[k] for k in z.files}
    meta = json.loads(named.pop("__meta__").tobytes().decode())
    arrays = [named.pop(f"a{i}") for i in range(len(named))]
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, UnicodeDecodeError) as e:
    raise TranscriptError(f"payload cannot be read ({type(e).__name__}: {e})", file=file) from None
  if not isinstance(meta, dict):
    raise TranscriptError("metadata is not an object", file=file)
  return arrays, meta


def _specs(leaves) -> list[list[Any]]:
  return [[np.dtype(x.dtype).str, list(np.shape(x))] for x in leaves]


def save_checkpoint(path: str | os.PathLike, state: TrainState, *, num_verified: int,
                    authenticate: Authenticate) -> str:
  """Writes `state` atomically; returns the file's SHA-256 (for the transcript)."""
  leaves, treedef = jax.tree_util.tree_flatten((state.params, state.opt_state))
  host = [np.asarray(x) for x in jax.device_get(leaves)]
  meta = {"step": state.step, "num_verified": num_verified, "treedef": str(treedef),
          "leaves": _specs(host)}
  data = encode_blob(host, meta, label=CHECKPOINT_LABEL, authenticate=authenticate)
  atomic_write(path, data)
  return sha256_hex(data)


def load_checkpoint(path: str | os.PathLike, template: TrainState, *, expected_sha256: str | None = None,
                    authenticate: Authenticate | None = None) -> tuple[TrainState, dict[str, Any]]:
  """Reads a checkpoint and rebuilds the state on the host.

  Args:
    path: the checkpoint file.
    template: a state of the same model and optimizer (e.g. `init_state`):
      gives the tree structure, dtypes and shapes the file must have.
    expected_sha256, authenticate: see `decode_blob`.

  Returns:
    The state (numpy leaves; put it on the trusted device) and the metadata.

  Raises:
    TranscriptError: the file is damaged, forged or of another model.
  """
  file, arrays, meta = _read_blob(path, CHECKPOINT_LABEL, expected_sha256, authenticate)
  leaves, treedef = jax.tree_util.tree_flatten((template.params, template.opt_state))
  if meta.get("treedef") != str(treedef) or meta.get("leaves") != _specs(leaves):
    raise TranscriptError("checkpoint does not match the model and optimizer (tree structure, dtypes "
                          "or shapes differ)", file=file)
  if _specs(arrays) != _specs(leaves):
    raise TranscriptError("checkpoint arrays do not match their metadata", file=file)
  step = meta.get("step")
  if not isinstance(step, int) or isinstance(step, bool) or step < 0:
    raise TranscriptError(f"checkpoint step {step!r} is not a non-negative int", file=file)
  params, opt_state = jax.tree_util.tree_unflatten(treedef, arrays)
  return TrainState(step=step, params=params, opt_state=opt_state), meta


def _read_blob(path, label: bytes, expected_sha256, authenticate):
  """Reads and decodes one blob file; returns (file name, arrays, metadata)."""
  file = os.fspath(path)
  with open(file, "rb") as f:
    data = f.read()
  arrays, meta = decode_blob(data, file=file, label=label, expected_sha256=expected_sha256,
                             authenticate=authenticate)
  return file, arrays, meta


def save_report(path: str | os.PathLike, step: int, leaves: list[np.ndarray], loss: np.float32, *,
                authenticate: Authenticate) -> str:
  """Writes a validated report's leaves and loss atomically; returns the file's SHA-256."""
  data = encode_blob([*leaves, np.asarray(loss, np.float32)], {"step": step},
                     label=REPORT_LABEL, authenticate=authenticate)
  atomic_write(path, data)
  return sha256_hex(data)


def load_report(path: str | os.PathLike, *, step: int, expected_sha256: str | None = None,
                authenticate: Authenticate | None = None,
                num_shards: int = 1) -> tuple[list[np.ndarray], np.float32 | np.ndarray]:
  """Reads a kept report: its gradient leaves (tree order) and its loss (with
  S = `num_shards` > 1 shards, one loss per shard).

  Raises:
    TranscriptError: the file is damaged, forged or for another step.
  """
  file, arrays, meta = _read_blob(path, REPORT_LABEL, expected_sha256, authenticate)
  shape = () if num_shards == 1 else (num_shards,)
  if meta.get("step") != step or not arrays or arrays[-1].shape != shape or arrays[-1].dtype != np.float32:
    raise TranscriptError(f"report file is not the report of step {step}", file=file, step=step)
  return arrays[:-1], (np.float32(arrays[-1]) if num_shards == 1 else arrays[-1])
