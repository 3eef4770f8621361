"""The trusted update: one optax chain, clip first (docs/design.md section 4, 4).

The chain is a `named_chain` so its parts read by name: ``clip`` then
``optimizer``. The worker never applies an update and cannot skip the clip.

With S > 1 shards (docs/design.md, "Shards") the gradient has a leading shard
axis and the chain is ``clip_shards`` (the clip applied to each shard on its
own, `clip_each_shard`), ``mean_shards`` (the mean over the shard axis,
`mean_over_shards`), then ``optimizer``: each shard is clipped *before* the
average, so one shard moves any coordinate of the mean by at most 2C/S.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
import optax

ClipMode = Literal["elementwise", "global_norm", "none"]


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """SGD with momentum and decoupled-into-the-gradient weight decay.

  Attributes:
    learning_rate: eta (constant). Pass an optax schedule through `optimizer=`
      of `make_update_transform` for decay schedules.
    momentum: heavy-ball momentum m (0 disables it).
    weight_decay: L2 coefficient added to the clipped gradient, as in the
      paper's PyTorch code (``g + wd * params``), computed by the trusted side.
  """

  learning_rate: float = 0.05
  momentum: float = 0.9
  weight_decay: float = 5e-4


def clip_transform(mode: ClipMode, value: float | None) -> optax.GradientTransformation:
  """Element-wise clip to [-C, C] (the paper), global-norm clip to C, or identity."""
  if mode == "none":
    return optax.identity()
  if value is None or not value > 0:
    raise ValueError(f"clip mode {mode!r} needs a positive clip value C, got {value!r}")
  if mode == "elementwise":
    return optax.clip(value)
  if mode == "global_norm":
    return optax.clip_by_global_norm(value)
  raise ValueError(f"unknown clip mode {mode!r}; choose 'elementwise', 'global_norm' or 'none'")


def clip_each_shard(clip: optax.GradientTransformation) -> optax.GradientTransformation:
  """Applies the stateless transformation `clip` to each shard of updates with
  a leading shard axis (`jax.vmap` over it), keeping the axis.

  `clip` must keep no state that depends on the updates (the clips of
  `clip_transform` keep none): its state is made from the parameters and
  passed through unchanged.
  """

  def init_fn(params):
    return clip.init(params)

  def update_fn(updates, state, params=None):
    del params  # The clips read no parameters.
    clipped = jax.vmap(lambda u: clip.update(u, state)[0])(updates)
    return clipped, state

  return optax.GradientTransformation(init_fn, update_fn)


def _mean_rows(u: jax.Array) -> jax.Array:
  # The rows added one by one, then divided: elementwise, so XLA fuses it with
  # the clip into one pass (a reduce over the leading axis ran 4x slower on CPU).
  total = u[0]
  for s in range(1, u.shape[0]):
    total = total + u[s]
  return total / jnp.asarray(u.shape[0], u.dtype)


def mean_over_shards() -> optax.GradientTransformation:
  """The mean over the leading shard axis of every update leaf (stateless):
  ``(u[0] + u[1] + ... + u[S-1]) / S``, added in shard order."""

  def update_fn(updates, state, params=None):
    del params
    return jax.tree_util.tree_map(_mean_rows, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def sgd_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
  """``add_decayed_weights(wd)`` then ``sgd(lr, momentum)``."""
  parts = []
  if config.weight_decay:
    parts.append(optax.add_decayed_weights(config.weight_decay))
  parts.append(optax.sgd(config.learning_rate, momentum=config.momentum or None))
  return optax.chain(*parts)


def _chain(clip: ClipMode, clip_value: float | None, optimizer: optax.GradientTransformation,
           num_shards: int) -> optax.GradientTransformation:
  if num_shards == 1:
    return optax.named_chain(("clip", clip_transform(clip, clip_value)), ("optimizer", optimizer))
  return optax.named_chain(("clip_shards", clip_each_shard(clip_transform(clip, clip_value))),
                           ("mean_shards", mean_over_shards()), ("optimizer", optimizer))


@functools.lru_cache(maxsize=64)
def _cached_sgd_transform(clip: ClipMode, clip_value: float | None, optimizer: OptimizerConfig,
                          num_shards: int = 1) -> optax.GradientTransformation:
  return _chain(clip, clip_value, sgd_optimizer(optimizer), num_shards)


def make_update_transform(
    clip: ClipMode,
    clip_value: float | None,
    optimizer: OptimizerConfig | optax.GradientTransformation,
    num_shards: int = 1,
) -> optax.GradientTransformation:
  """The trusted update ``named_chain(("clip", ...), ("optimizer", ...))``; with
  S > 1 shards ``named_chain(("clip_shards", ...), ("mean_shards", ...),
  ("optimizer", ...))``, taking gradients with a leading shard axis.

  Args:
    clip: "elementwise", "global_norm" or "none".
    clip_value: the bound C.
    optimizer: an `OptimizerConfig` (SGD, the analysed case) or any optax
      transformation (see `ginn_jax.analysis` for what the clip then bounds).
    num_shards: S; with S > 1 each shard is clipped, then the shards averaged.
  """
  if isinstance(optimizer, OptimizerConfig):  # Equal configs share one object: no recompiles.
    return _cached_sgd_transform(clip, clip_value, optimizer, int(num_shards))
  return _chain(clip, clip_value, optimizer, int(num_shards))
