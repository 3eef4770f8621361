"""The trusted side of the ``"aggregate"`` shard mode (docs/design.md section 11.2).

The worker reports the mean m of its S shard gradients. After m is committed,
the trusted side draws, per gradient leaf l, two secret Gaussian vectors
``(a_l, b_l)`` (`projection_vectors`, seeded by `keys.projection_seed`: the
audit secret, the step and the report digest; drawn on the host) and asks the worker for the
scalars ``v_{s,l} = a_l^T G_{s,l} b_l`` of every shard s. It then checks:

* **the sum** (`sum_errors`): ``|sum_s v_{s,l} - S a_l^T M_l b_l| <= rho *
  (S (||M_l||_F + |a_l^T M_l b_l|) + sum_s |v_{s,l}|)`` for every leaf, with
  rho the run's per-leaf ``rel_l2`` tolerance. ``a^T D b`` has standard
  deviation ``||D||_F`` over the draw of a and b, so the bound is in the
  units of the projection itself; ``sum_s |v_{s,l}|`` keeps honest rounding
  inside it when the shards' gradients cancel in the mean (the worker can
  only raise it by lying about a v_s, which is what the shard checks catch);
* **each drawn shard** (`shard_errors`): ``|v_{s,l} - a_l^T G^ref_{s,l} b_l| /
  ||G^ref_{s,l}||_F <= rel_l2`` against the shard's gradient the trusted side
  computed itself (re-computation, or the evaluation of its checked witness).

A change D of the committed mean at leaf l passes the sum check without a lie
only if ``|a^T D b| <= tau_l / S``; `analysis.projection_miss_probability`
bounds how likely that is.
"""
from __future__ import annotations

import functools
import hashlib

import jax
import jax.numpy as jnp
import numpy as np

from ginn_jax._src import errors
from ginn_jax._src import shards as shards_lib
from ginn_jax._src.boundary import Projections

DIGEST_DOMAIN = b"ginn_jax/projections/v1"
_TINY = 1e-30


def _sizes(shapes) -> list[int]:
  return [n for shape in shapes for n in shards_lib.matrix_shape(shape)]


def _draw(seed: np.ndarray, shapes) -> tuple:
  """The vectors on the host: one standard Gaussian float32 draw of all their
  elements (numpy's Philox keyed by the 64-bit `seed`), cut in order a_0, b_0,
  a_1, b_1, ... (read-only views). On the host, since a draw per step on the
  trusted device cost more than the rest of the challenge (jax's threefry
  normal: 0.3 ms for mnist_cnn's 3,000 elements on this CPU)."""
  sizes = _sizes(shapes)
  hi, lo = (int(x) for x in np.asarray(seed, np.uint32))
  flat = np.random.Generator(np.random.Philox(key=(hi << 32) | lo)).standard_normal(sum(sizes),
                                                                                  dtype=np.float32)
  flat.flags.writeable = False  # The trusted side's own; the worker is sent copies.
  cuts = np.split(flat, np.cumsum(sizes)[:-1])
  return tuple(zip(cuts[0::2], cuts[1::2])), flat


def projection_vectors(seed: np.ndarray, shapes, device: jax.Device | None = None) -> tuple:
  """One ``(a_l, b_l)`` pair of standard Gaussian float32 vectors per leaf
  shape in `shapes` (``a_l`` of the leaf's rows, ``b_l`` of its columns,
  `shards.matrix_shape`), from the key data `seed` (2 uint32): host arrays,
  or on `device` when given."""
  vectors, _ = _draw(seed, shapes)
  return vectors if device is None else jax.device_put(vectors, device)


@functools.partial(jax.jit, static_argnums=1)
def _challenge(flat, shapes, leaves):
  sizes = _sizes(shapes)
  cuts, start = [], 0
  for n in sizes:
    cuts.append(flat[start:start + n])
    start += n
  # The barrier keeps the cuts out of the products' fusions (fused, they cost 1.7x as much
  # on VGG-11 here: the products are no longer plain matrix-vector products).
  cuts = jax.lax.optimization_barrier(cuts)
  return _mean_projection(leaves, tuple(zip(cuts[0::2], cuts[1::2])))


def challenge(seed: np.ndarray, leaves, device: jax.Device):
  """The vectors for the shapes of `leaves` (the committed mean, on `device`;
  `projection_vectors`, host arrays) and `mean_projection` of the leaves
  with them, dispatched and not waited for: ``(vectors, pending)``, where
  ``read(pending)`` gives ``(t, norms)`` (float64, host)."""
  shapes = tuple(tuple(int(d) for d in x.shape) for x in leaves)
  vectors, flat = _draw(seed, shapes)
  return vectors, _challenge(jax.device_put(flat, device), shapes, list(leaves))


def read(pending) -> tuple[np.ndarray, np.ndarray]:
  """``(t, norms)`` of a `challenge`, as float64 host arrays (waits for them)."""
  t, norms = jax.device_get(pending)
  return np.asarray(t, np.float64), np.asarray(norms, np.float64)


@jax.jit
def _mean_projection(leaves, vectors):
  t = shards_lib.project_leaves(leaves, vectors)
  norms = jnp.stack([jnp.linalg.norm(g.astype(jnp.float32).ravel()) for g in leaves])
  return t, norms


def mean_projection(leaves, vectors) -> tuple[np.ndarray, np.ndarray]:
  """``(t, norms)`` of the committed mean's leaves: ``t_l = a_l^T M_l b_l`` and
  ``||M_l||_F``, as float64 host arrays (one pass over the mean)."""
  t, norms = jax.device_get(_mean_projection(list(leaves), tuple(vectors)))
  return np.asarray(t, np.float64), np.asarray(norms, np.float64)


def validate_projections(answer: object, *, step: int, num_shards: int,
                         paths: tuple[str, ...]) -> np.ndarray:
  """The worker's `Projections`, checked: a float array of shape ``(S, L)``,
  all finite. Returns it as float32 (a host copy).

  Raises:
    ProjectionViolation: naming the step, and the shard and leaf of a
      non-finite value.
  """
  def bad(reason, **kw):
    return errors.ProjectionViolation(step=step, leaf=kw.pop("leaf", "projections"), reason=reason, **kw)

  if not isinstance(answer, Projections):
    raise bad(f"expected Projections, got {type(answer).__name__}")
  if isinstance(answer.step, (bool, np.bool_)) or not isinstance(answer.step, (int, np.integer)) \
      or answer.step != step:
    raise bad(f"the projections are for step {answer.step!r}, not {step}")
  values = answer.values
  if not isinstance(values, (np.ndarray, jax.Array)):
    raise bad(f"values is a {type(values).__name__}, expected an array of shape "
              f"({num_shards}, {len(paths)})")
  values = np.array(jax.device_get(values), copy=True)
  want = (num_shards, len(paths))
  if values.shape != want:
    raise bad(f"{values.shape[0] if values.ndim else 0} x {values.shape[1] if values.ndim > 1 else 0} "
              f"scalars (shape {values.shape}), expected one per shard and leaf: shape {want}")
  if values.dtype.kind != "f":
    raise bad(f"values have dtype {values.dtype}, expected a float dtype")
  values = values.astype(np.float32)
  nonfinite = np.argwhere(~np.isfinite(values))
  if nonfinite.size:
    s, l = (int(i) for i in nonfinite[0])
    raise bad(f"the scalar of shard {s} at leaf {paths[l]} is {values[s, l]}", shard=s, leaf=paths[l])
  return values


def projections_digest(step: int, report_digest: bytes, values: np.ndarray) -> bytes:
  """SHA-256 of the domain, the step, the report digest and the scalars'
  float32 little-endian bytes: what the transcript records and the coins read."""
  h = hashlib.sha256(DIGEST_DOMAIN)
  h.update(step.to_bytes(8, "big"))
  h.update(report_digest)
  h.update(f"{values.shape}".encode())
  h.update(np.ascontiguousarray(values, "<f4").tobytes())
  return h.digest()


def sum_errors(values: np.ndarray, t: np.ndarray, norms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per leaf: ``|sum_s v_s - S t|`` and the scale its tolerance multiplies
  (``S (||M||_F + |t|) + sum_s |v_s|``), in float64."""
  v = values.astype(np.float64)
  S = v.shape[0]
  return np.abs(v.sum(axis=0) - S * t), S * (norms + np.abs(t)) + np.abs(v).sum(axis=0)


def check_sum(values: np.ndarray, t: np.ndarray, norms: np.ndarray, rho: float, *, step: int,
              paths: tuple[str, ...]) -> float:
  """Raises `ProjectionViolation` naming the first leaf whose shards' scalars
  do not add up to S times the mean's projection (module docstring); returns
  the largest relative error (error / scale)."""
  diff, scale = sum_errors(values, t, norms)
  rel = diff / np.maximum(scale, _TINY)
  bad = np.flatnonzero(~(rel <= rho))
  if bad.size:
    l = int(bad[0])
    raise errors.ProjectionViolation(
        step=step, leaf=paths[l], error={"rel": float(rel[l]), "tolerance": float(rho)},
        reason=(f"the {values.shape[0]} shards' scalars add up to {values[:, l].astype(np.float64).sum():.6g}"
                f", but {values.shape[0]} x the projection of the committed mean is "
                f"{values.shape[0] * t[l]:.6g}: the mean is not the mean of the gradients the "
                "worker accounts for"))
  return float(rel.max()) if rel.size else 0.0


@jax.jit
def _shard_errors(ref_leaves, vectors, values):
  ref = shards_lib.project_leaves(ref_leaves, vectors)
  norms = jnp.stack([jnp.linalg.norm(g.astype(jnp.float32).ravel()) for g in ref_leaves])
  return jnp.abs(values - ref) / jnp.maximum(norms, _TINY)


def shard_errors(ref_leaves, vectors, values) -> jax.Array:
  """``|v_l - a_l^T G_l b_l| / ||G_l||_F`` per leaf, for a shard's trusted
  gradient leaves `ref_leaves` and its claimed scalars `values` (on the
  trusted device)."""
  return _shard_errors(list(ref_leaves), tuple(vectors), values)
