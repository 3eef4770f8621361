"""The messages that cross the trust boundary.

The trusted runtime sends a `WorkOrder`; the worker answers with a
`GradientReport`. On a step drawn for a witness check, and only after its
report is committed, the runtime also sends a `WitnessRequest` and the worker
answers with a `Witness`. Nothing derived from the audit secret (MAC key,
coins, Freivalds vectors) is ever part of a message to the worker.
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


@dataclasses.dataclass(frozen=True)
class WitnessRequest:
  """The runtime's challenge for the witness of `step` (sent after the report
  of `step` was committed and its coin drawn).

  Attributes:
    step: the step whose witness is asked for (the one just reported).
    order: that step's work order (a worker that kept no witness can compute
      it again from this).
    shard: with ``num_shards > 1``, the shard whose witness is asked for (the
      witness of its sub-batch and key, `ginn_jax._src.shards`); None for the
      whole batch.
  """

  step: int
  order: WorkOrder
  shard: int | None = None


@dataclasses.dataclass(frozen=True)
class Witness:
  """What a worker claims about the inside of a step (docs/design.md section 12).

  Attributes:
    step: the step.
    outputs: the output of every witnessed product (matrix product or
      convolution) of the step's gradient program, in the order of the run's
      witness plan (`ginn_jax.witness_plan`).
    input_grads: empty (kept for the message's form).

  Untrusted, like a report: the runtime validates every field.
  """

  step: Any
  outputs: Any
  input_grads: Any = ()
