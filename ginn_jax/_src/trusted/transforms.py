"""The trusted update: one optax chain, clip first (docs/design.md section 4, 4).

The chain is a `named_chain` so its parts read by name: ``clip`` then
``optimizer``. The worker never applies an update and cannot skip the clip.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Literal

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


def sgd_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
  """``add_decayed_weights(wd)`` then ``sgd(lr, momentum)``."""
  parts = []
  if config.weight_decay:
    parts.append(optax.add_decayed_weights(config.weight_decay))
  parts.append(optax.sgd(config.learning_rate, momentum=config.momentum or None))
  return optax.chain(*parts)


@functools.lru_cache(maxsize=64)
def _cached_sgd_transform(clip: ClipMode, clip_value: float | None,
                          optimizer: OptimizerConfig) -> optax.GradientTransformation:
  return optax.named_chain(("clip", clip_transform(clip, clip_value)),
                           ("optimizer", sgd_optimizer(optimizer)))


def make_update_transform(
    clip: ClipMode,
    clip_value: float | None,
    optimizer: OptimizerConfig | optax.GradientTransformation,
) -> optax.GradientTransformation:
  """The trusted update ``named_chain(("clip", ...), ("optimizer", ...))``.

  Args:
    clip: "elementwise", "global_norm" or "none".
    clip_value: the bound C.
    optimizer: an `OptimizerConfig` (SGD, the analysed case) or any optax
      transformation (see `ginn_jax.analysis` for what the clip then bounds).
  """
  if isinstance(optimizer, OptimizerConfig):  # Equal configs share one object: no recompiles.
    return _cached_sgd_transform(clip, clip_value, optimizer)
  return _cached_transform(clip, clip_value, optimizer)


@functools.lru_cache(maxsize=64)
def _cached_transform(clip: ClipMode, clip_value: float | None,
                      optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
  """The chain of a given optax transformation (hashed by its functions), built
  once, so runtimes sharing one optimizer object share one jitted update."""
  return optax.named_chain(("clip", clip_transform(clip, clip_value)), ("optimizer", optimizer))
