"""The messages that cross the trust boundary.

The trusted runtime sends a `WorkOrder`; the worker answers with a
`GradientReport`. On a step drawn for a witness check, and only after its
report is committed, the runtime also sends a `WitnessRequest` and the worker
answers with a `Witness`. In a run of S > 1 shards in ``"aggregate"`` mode,
after the report of the shards' mean is committed, the runtime sends a
`ProjectionRequest` (the secret vectors r of that step, drawn only now) and
the worker answers with `Projections` (the S x L scalars ``<r_l, g_{s,l}>``).
Apart from those vectors, nothing derived from the audit secret (MAC key,
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


@dataclasses.dataclass(frozen=True)
class ProjectionRequest:
  """The runtime's projection challenge of an ``"aggregate"`` run (docs/design.md
  section 11.2), sent after the report of `step` (the shards' mean) was
  committed and before any shard's coin is drawn.

  Attributes:
    step: the step just reported.
    order: that step's work order (a worker that kept no shard gradients can
      compute them again from it).
    vectors: one ``(a_l, b_l)`` pair of float32 vectors per gradient leaf, in
      the parameters' tree order (host arrays, the worker's own copies): leaf l read as a
      matrix G (`ginn_jax._src.shards.matrix_shape`) is projected as
      ``a_l^T G b_l``. Drawn from the audit secret, the step and the report
      digest; they reveal nothing of the coins.
  """

  step: int
  order: WorkOrder
  vectors: tuple


@dataclasses.dataclass(frozen=True)
class Projections:
  """What a worker claims about the shards behind its mean: ``values[s, l] =
  a_l^T G_{s,l} b_l`` for the gradient G_{s,l} of shard s at leaf l
  (`ginn_jax._src.shards.project_leaves`), an ``(S, L)`` float array.

  Untrusted, like a report: the runtime validates every field.
  """

  step: Any
  values: Any
