"""The only two messages that cross the trust boundary.

The trusted runtime sends a `WorkOrder`; the worker answers with a
`GradientReport`. Nothing else is exchanged: in particular nothing derived from
the audit secret (MAC key, verification coin) is ever part of a work order.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from ginn_jax._src.types import Params


@dataclasses.dataclass(frozen=True)
class WorkOrder:
  """What the trusted runtime asks the worker to compute for step `step`.

  Attributes:
    step: the training step.
    params: the parameters at the start of the step (on the trusted device).
    batch_indices: int32 indices into the committed training set.
    layer_key: the typed PRNG key for layer randomness (dropout) of this step.
  """

  step: int
  params: Params
  batch_indices: np.ndarray
  layer_key: jax.Array


@dataclasses.dataclass(frozen=True)
class GradientReport:
  """What a worker claims: the loss and gradient of `step`'s work order.

  The trusted runtime treats every field as untrusted input and validates it.
  """

  step: Any
  grads: Any
  loss: Any
