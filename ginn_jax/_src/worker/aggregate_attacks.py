"""Attackers of the ``"aggregate"`` shard mode (docs/design.md section 11.2).

An aggregate worker reports the mean m of its S shard gradients and, after m
is committed, the scalars ``v_{s,l} = <r_l, g_{s,l}>`` for the trusted side's
secret vectors. `AggregateLiarWorker` adds an extra term delta to m (the
gradient of a poisoned batch, a backdoor) and answers the challenge in one of
the ways a worker can try to account for it (`LIES`). The attacker that
replaces one shard's contribution in the mean and answers consistently with
it is any `MaliciousWorker` built with ``shard_mode="aggregate"`` and
``shards=[k]``.

Only worker-side and shared code: nothing here imports from `ginn_jax._src.trusted`.
"""
from __future__ import annotations

from typing import Any, Callable, Literal

import jax
import numpy as np
from jax.sharding import Mesh

from ginn_jax._src import shards as shards_lib
from ginn_jax._src.boundary import GradientReport, ProjectionRequest, Projections, Witness, WitnessRequest, WorkOrder
from ginn_jax._src.models import Model
from ginn_jax._src.types import PyTree
from ginn_jax._src.worker.malicious import Schedule, _poison_grad
from ginn_jax._src.worker.sharded import ShardedWorker

# How the liar answers the projection challenge of a scheduled step:
# "honest_scalars": the true v_s of every shard (the sum then misses S <r, delta>);
# "spread": every v_s moved by <r, delta> (the sum adds up; every shard lies);
# "one_shard": v_k moved by S <r, delta> (the sum adds up; shard k lies);
# "replayed": the scalars it gave for the previous step (computed before this r existed);
# "wrong_count": one shard's scalars fewer than S;
# "nan": NaN in shard k's scalar of the first leaf.
Lie = Literal["honest_scalars", "spread", "one_shard", "replayed", "wrong_count", "nan"]
LIES = ("honest_scalars", "spread", "one_shard", "replayed", "wrong_count", "nan")
_FORM_LIES = ("wrong_count", "nan")  # Lies about the answer's form only: the mean stays honest.

_project = jax.jit(shards_lib.project_leaves)


class AggregateLiarWorker:
  """An ``"aggregate"`` worker that adds a backdoor term to the mean on
  scheduled steps and lies about the shards behind it as `lie` says.

  Args:
    model: the model.
    data, labels: the worker's copy of the training set.
    num_shards: S (> 1).
    lie: one of `LIES` (module docstring).
    schedule: ``schedule(step) -> bool``, the steps to misbehave on.
    poison: ``poison(batch) -> batch`` (jittable, hashable); the extra term is
      ``lam`` times the gradient of the loss on ``poison`` of shard `shard`'s
      sub-batch. None: ``lam`` times the honest mean (a scaled step).
    lam: the extra term's weight.
    shard: the shard whose scalar carries the lie ("one_shard", "nan").
    mesh: the sharded worker's mesh.

  Attributes:
    malicious_steps: the steps on which it lied.
  """

  def __init__(self, model: Model, data: Any, labels: np.ndarray | None = None, *, num_shards: int,
               lie: Lie, schedule: Schedule, poison: Callable[[PyTree], PyTree] | None = None,
               lam: float = 1.0, shard: int = 0, mesh: Mesh | None = None):
    if lie not in LIES:
      raise ValueError(f"lie must be one of {LIES}, got {lie!r}")
    if not 0 <= shard < num_shards:
      raise ValueError(f"shard={shard} is not in range({num_shards})")
    self.sharded = ShardedWorker(model, data, labels, num_shards=num_shards, mesh=mesh,
                                 shard_mode=shards_lib.AGGREGATE)
    if not self.sharded.aggregate:
      raise ValueError(f"an aggregate attacker needs num_shards > 1, got {num_shards}")
    self.model, self.mesh, self.num_shards = model, self.sharded.mesh, int(num_shards)
    self.device = self.sharded.device
    self.lie, self.schedule, self.poison, self.lam, self.shard = lie, schedule, poison, float(lam), shard
    self.malicious_steps: list[int] = []
    self._delta: tuple[int, list[np.ndarray]] | None = None
    self._previous: np.ndarray | None = None  # The last answer it gave (for "replayed").

  def _extra(self, order: WorkOrder, mean: list[np.ndarray]) -> list[np.ndarray]:
    if self.poison is None:
      return [self.lam * m for m in mean]
    idx = shards_lib.shard_indices(np.asarray(order.batch_indices, np.int32), self.num_shards)[self.shard]
    local = lambda a: next(sh.data for sh in a.addressable_shards if sh.device == self.device)  # noqa: E731
    data = jax.tree_util.tree_map(local, self.sharded.data)
    params, indices, key = jax.device_put(
        (order.params, idx, shards_lib.shard_key(order.layer_key, self.shard)), self.device)
    with jax.default_matmul_precision("highest"):
      _, grads = _poison_grad(self.model, self.poison, params, data, indices, key)
    return [self.lam * np.asarray(g) for g in jax.device_get(jax.tree_util.tree_leaves(grads))]

  def __call__(self, order: WorkOrder) -> GradientReport:
    report = self.sharded(order)
    self._delta = None
    if not self.schedule(order.step) or self.lie in _FORM_LIES:
      return report
    leaves, treedef = jax.tree_util.tree_flatten(report.grads)
    mean = [np.asarray(x) for x in jax.device_get(leaves)]
    delta = [d.astype(m.dtype) for d, m in zip(self._extra(order, mean), mean)]
    self._delta = (order.step, delta)
    self.malicious_steps.append(order.step)
    return GradientReport(step=order.step, grads=treedef.unflatten([m + d for m, d in zip(mean, delta)]),
                          loss=np.asarray(jax.device_get(report.loss)))

  def project(self, request: ProjectionRequest) -> Projections:
    honest = np.asarray(jax.device_get(self.sharded.project(request).values), np.float32)
    values = honest
    if self.schedule(request.step):
      if self.lie in _FORM_LIES and request.step not in self.malicious_steps:
        self.malicious_steps.append(request.step)
      if self.lie == "wrong_count":
        values = honest[:-1]
      elif self.lie == "nan":
        values = honest.copy()
        values[self.shard, 0] = np.nan
      elif self.lie == "replayed":
        values = self._previous if self._previous is not None else np.zeros_like(honest)
      elif self._delta is not None and self._delta[0] == request.step and self.lie != "honest_scalars":
        vectors = jax.device_put(tuple(request.vectors), self.device)
        extra = np.asarray(jax.device_get(_project(jax.device_put(self._delta[1], self.device), vectors)))
        values = honest.copy()
        if self.lie == "spread":
          values += extra[None, :]
        else:  # "one_shard"
          values[self.shard] += self.num_shards * extra
    self._previous = honest
    return Projections(step=request.step, values=values)

  def witness(self, request: WitnessRequest) -> Witness:
    """The honest witness of the requested shard."""
    return self.sharded.witness(request)
