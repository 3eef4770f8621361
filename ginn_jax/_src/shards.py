"""How a step's batch is cut into shards (docs/design.md, "Shards").

Shared pure code: the trusted runtime and the worker both import it, so the
cut and the shard keys have one definition. With S = ``num_shards`` and B the
batch size (B % S == 0):

* **indices**: shard s gets the contiguous slice
  ``batch_indices[s * B/S:(s + 1) * B/S]`` of the work order's indices
  (`shard_indices` returns them as an ``(S, B/S)`` array);
* **layer key**: shard s uses ``fold_in(layer_key, s)`` of the work order's
  layer key (`shard_keys`); the worker does not choose it, it is a public
  function of the key the trusted side sent. With S = 1 the one shard is the
  whole batch and uses the layer key itself, so a run with one shard is
  exactly a run without shards.

The gradient of shard s is then ``grad_fn(params, data[indices[s]], keys[s])``
with the one gradient function of `step.py`; a report of S > 1 shards stacks
them along a leading shard axis (every gradient leaf ``(S, *param.shape)``,
the loss ``(S,)``).

Two shard modes (`SHARD_MODES`, docs/design.md section 11.2): ``"per_shard"``
reports every shard's gradient as above; ``"aggregate"`` reports their mean
(every leaf shaped as its parameter) and the S losses, and answers a secret
projection challenge with the scalars ``<r_l, g_{s,l}>`` (`project_leaves`,
one per shard and leaf). The projection is defined here once, for both sides:
leaf l read as a matrix G (`matrix_shape`: all axes but the last as rows) and
``<r_l, G> = a_l^T G b_l`` for the vectors ``(a_l, b_l)`` the trusted side
drew.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

# The mesh axis a sharded worker splits the shards over.
SHARD_AXIS = "shards"

PER_SHARD = "per_shard"
AGGREGATE = "aggregate"
SHARD_MODES = (PER_SHARD, AGGREGATE)
# The mode of a run with S > 1 shards when none is named (docs/performance.md,
# "Shards": the trusted cost per step of `aggregate` does not grow with S).
DEFAULT_SHARD_MODE = AGGREGATE


def resolve_shard_mode(shard_mode: str | None, num_shards: int) -> str:
  """The shard mode of a run: `shard_mode` checked, or the default for
  `num_shards` when None (`DEFAULT_SHARD_MODE` for S > 1; ``"per_shard"``
  for one shard, where the two modes are the same run without shards).

  Raises:
    ValueError: `shard_mode` is not None or one of `SHARD_MODES`.
  """
  if shard_mode is None:
    return DEFAULT_SHARD_MODE if num_shards > 1 else PER_SHARD
  if shard_mode not in SHARD_MODES:
    raise ValueError(f"shard_mode must be one of {SHARD_MODES} (or None for the default), got "
                     f"{shard_mode!r}")
  return shard_mode if num_shards > 1 else PER_SHARD


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
  """How the projection reads a leaf of `shape` as a matrix: ``(rows, cols)``
  with the last axis as columns and every other axis as rows (a scalar leaf
  is 1 x 1, a vector 1 x n).

  >>> matrix_shape((3, 3, 16, 32)), matrix_shape((10,)), matrix_shape(())
  ((144, 32), (1, 10), (1, 1))
  """
  shape = tuple(int(d) for d in shape)
  if not shape:
    return 1, 1
  return int(np.prod(shape[:-1], dtype=np.int64)), shape[-1]


def project_leaf(g: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
  """``a^T G b`` of one leaf (traceable): G is `g` as a ``matrix_shape`` matrix,
  in float32 at the highest precision, as ``a . (G b)``: one pass over G."""
  rows, cols = matrix_shape(g.shape)
  m = g.reshape(rows, cols).astype(jnp.float32)
  gb = jnp.dot(m, b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
  return jnp.dot(a.astype(jnp.float32), gb, precision=jax.lax.Precision.HIGHEST)


def project_leaves(leaves, vectors) -> jax.Array:
  """The ``(L,)`` float32 projections ``a_l^T G_l b_l`` of the leaves of one
  gradient (traceable; `vectors` holds one ``(a_l, b_l)`` per leaf)."""
  return jnp.stack([project_leaf(g, a, b) for g, (a, b) in zip(leaves, vectors)])


def check_num_shards(batch_size: int, num_shards: int) -> None:
  """Raises ValueError unless `num_shards` is a positive int dividing `batch_size`."""
  if isinstance(num_shards, bool) or not isinstance(num_shards, (int, np.integer)) or num_shards < 1:
    raise ValueError(f"num_shards must be a positive int, got {num_shards!r}")
  if batch_size % num_shards:
    raise ValueError(
        f"batch_size={batch_size} is not a multiple of num_shards={num_shards}: every shard must "
        f"have the same number of examples; choose a batch size divisible by {num_shards} (e.g. "
        f"{(batch_size // num_shards + 1) * num_shards}) or another shard count")


def shard_indices(indices, num_shards: int) -> np.ndarray:
  """The batch indices cut into `num_shards` contiguous shards: shape ``(S, B/S)``.

  >>> shard_indices(np.arange(6), 3).tolist()
  [[0, 1], [2, 3], [4, 5]]
  """
  indices = np.asarray(indices)
  check_num_shards(indices.shape[0], num_shards)
  return indices.reshape(num_shards, indices.shape[0] // num_shards)


@functools.partial(jax.jit, static_argnums=1)
def _fold_all(key: jax.Array, num_shards: int) -> jax.Array:
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(num_shards, dtype=jnp.uint32))


def shard_keys(layer_key: jax.Array, num_shards: int) -> jax.Array:
  """The layer keys of the shards: ``fold_in(layer_key, s)`` for s < S, as one
  typed key array of shape ``(S,)`` on `layer_key`'s device (bitwise the keys
  ``jax.random.fold_in(layer_key, s)`` would give one at a time). For S = 1,
  use `layer_key` itself (see the module docstring)."""
  return _fold_all(layer_key, int(num_shards))


_fold_one = jax.jit(jax.random.fold_in)


def shard_key(layer_key: jax.Array, shard: int) -> jax.Array:
  """The layer key of shard `shard` (S > 1): ``fold_in(layer_key, shard)`` on
  `layer_key`'s device, the shard index transferred explicitly; bitwise
  ``shard_keys(layer_key, S)[shard]``."""
  device = next(iter(layer_key.devices()))
  return _fold_one(layer_key, jax.device_put(np.uint32(shard), device))


@functools.partial(jax.jit, static_argnums=1)
def shard_row(leaves: list[jax.Array], shard: int) -> list[jax.Array]:
  """Row `shard` of every leaf of a sharded report, where the leaves are (a
  static index: no host-to-device transfer)."""
  return [leaf[shard] for leaf in leaves]


def stack_shards(trees: list) -> object:
  """Stacks per-shard pytrees (losses or gradients) along a new leading axis."""
  return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def sharded_grads(grad_fn, params, indices, layer_key: jax.Array, num_shards: int):
  """``(losses (S,), grads with leaves (S, *param.shape))`` of a step, every
  shard computed by `grad_fn` (a `DeviceGradFn`: the verifier's per-shard
  function) on its device, one after the other. For the auditor, which
  re-trains sharded steps; workers use `ShardedWorker`."""
  idx = shard_indices(indices, num_shards)
  outs = [grad_fn(params, idx[s], shard_key(layer_key, s)) for s in range(num_shards)]
  return stack_shards([o[0] for o in outs]), stack_shards([o[1] for o in outs])
