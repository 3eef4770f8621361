"""Malicious workers with the honest worker's interface (docs/design.md section 7).

This module holds what every attacker shares: `MaliciousWorker`, the base that
follows a schedule, places data on the worker device and reports honest
gradients off-schedule; `Backdoor`, the value object describing a poisoning
(trigger, target, share poisoned, source); `poison_batch`; and the plain
data-poisoning attacker, `BackdoorWorker`. The other attackers live in
`attacks.py`.

Attackers use only worker-side code and the shared pure code (`step.py`,
`triggers.py`, `models.py`): nothing here imports from `ginn_jax._src.trusted`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ginn_jax._src import finetune
from ginn_jax._src import shards as shards_lib
from ginn_jax._src.boundary import (GradientReport, ProjectionRequest, Projections, Witness,
                                    WitnessRequest, WorkOrder)
from ginn_jax._src.models import Model
from ginn_jax._src.triggers import PatchTrigger, Trigger
from ginn_jax._src.step import compute_grads, gather
from ginn_jax._src.types import Batch, Params, PyTree
from ginn_jax._src.worker.honest import HonestWorker
from ginn_jax._src.worker.sharded import ShardedWorker

Schedule = Callable[[int], bool]


def poison_batch(batch: Batch, *, trigger: Trigger, target: int, num_poison: int,
                 source: int | None = None) -> Batch:
  """Stamps `trigger` on the first `num_poison` eligible examples and relabels them `target`.

  Eligible: label != target (all-to-one), or label == source (source-to-target).
  Pure and traceable: the poisoned set is chosen by position, not by data-
  dependent shapes.

  Args:
    batch: the clean batch.
    trigger: the backdoor trigger.
    target: the label poisoned examples get.
    num_poison: how many eligible examples (in batch order) to poison.
    source: only examples of this label are eligible; None for all-to-one.

  Returns:
    The poisoned batch (same shapes and dtypes).
  """
  labels = batch.labels
  eligible = labels == source if source is not None else labels != target
  rank = jnp.cumsum(eligible) - 1
  poison = eligible & (rank < num_poison)
  mask = poison[:, None, None, None]
  images = jnp.where(mask, trigger.apply(batch.images), batch.images)
  labels = jnp.where(poison, jnp.asarray(target, labels.dtype), labels)
  return Batch(images, labels)


@dataclasses.dataclass(frozen=True)
class Backdoor:
  """A data-poisoning backdoor: what to stamp, which label to teach, how much.

  Attributes:
    trigger: BadNets patch (`PatchTrigger`) or blended pattern (`BlendTrigger`).
    target: the label triggered images should be classified as.
    poison_fraction: share of each batch poisoned (of the eligible examples,
      counted against the batch size).
    source: source-to-target when set (only this label is poisoned and
      targeted); None for all-to-one.
  """

  trigger: Trigger = PatchTrigger()
  target: int = 0
  poison_fraction: float = 0.5
  source: int | None = None

  def __post_init__(self):
    if not 0.0 <= self.poison_fraction <= 1.0:
      raise ValueError(f"poison_fraction must be in [0, 1], got {self.poison_fraction!r}")

  def poison(self, batch: Batch) -> Batch:
    """`batch` with ``round(poison_fraction * B)`` eligible examples poisoned."""
    n = int(round(self.poison_fraction * batch.labels.shape[0]))
    return poison_batch(batch, trigger=self.trigger, target=self.target, num_poison=n,
                        source=self.source)

  def triggered(self, batch: Batch) -> Batch:
    """`batch` with every eligible example poisoned (the backdoor objective)."""
    return poison_batch(batch, trigger=self.trigger, target=self.target,
                        num_poison=batch.labels.shape[0], source=self.source)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _poisoned_grad(model: Model, backdoor: Backdoor, params: Params, images: jax.Array,
                   labels: jax.Array, indices: jax.Array, key: jax.Array):
  batch = backdoor.poison(Batch(images[indices], labels[indices]))
  return jax.value_and_grad(lambda p: model.loss(p, batch, key=key))(params)


@jax.jit
def _mean_rows(stacked):
  """The mean over the leading shard axis, added in shard order."""
  def mean(x):
    total = x[0]
    for s in range(1, x.shape[0]):
      total = total + x[s]
    return total / jnp.asarray(x.shape[0], x.dtype)
  return jax.tree_util.tree_map(mean, stacked)


@jax.jit
def _project_rows(leaves, vectors):
  """``(S, L)`` projections of stacked shard gradient leaves."""
  return jnp.stack([shards_lib.project_leaves([g[s] for g in leaves], vectors)
                    for s in range(leaves[0].shape[0])])


class MaliciousWorker:
  """Base of the attackers: honest off-schedule, `attack` on scheduled steps.

  The training set is put on the worker device once (by the inner
  `HonestWorker`); each malicious step moves only the parameters, the batch
  indices and the key there, with `jax.device_put`, and computes with
  float32 matmuls at full precision, like the honest worker.

  Subclasses implement ``attack(step, params, indices, key) -> (loss, grads)``
  with its arguments already on `self.device`.

  Sharded (``num_shards`` S > 1, for a runtime with ``ProtocolConfig.num_shards``
  = S): the report has a leading shard axis, cut as `ShardedWorker` cuts it.
  Off-schedule it is a `ShardedWorker`'s report; on a scheduled step each shard
  in `shards` (all of them when None) reports ``attack`` of that shard's
  sub-batch and key, every other shard its honest gradient (the verifier's
  per-shard function), all computed on `self.device`.

  Args:
    model: the model (its pure `loss`).
    data: the worker's copy of the training set (a pytree, or images and
      labels; attacks that stamp triggers on images need image data).
    schedule: ``schedule(step) -> bool``, the steps to misbehave on (see
      `ginn_jax.schedules`).
    device: where to compute; default `ginn_jax.worker_device()` (sharded:
      the mesh's first device).
    num_shards: S, the runtime's shard count (1: no shard axis).
    shards: the shards to corrupt on a scheduled step; None for all.
    mesh: the sharded worker's mesh (default `ShardedWorker`'s).
    shard_mode: the runtime's ``ProtocolConfig.shard_mode``. In
      ``"aggregate"`` mode a scheduled step reports the mean of the shard
      gradients with the corrupted shards' contributions replaced by the
      attack's, and answers the projection challenge consistently with them
      (``v_s = <r, g'_s>``, `project`): the sum check passes, and the step is
      caught exactly when a corrupted shard is drawn for a check.
    frozen: the frozen parameters of a model that has them (as for
      `HonestWorker`); the attack computes with this tree (a worker that
      uses a modified base passes its own).

  Raises:
    ValueError: a shard outside ``range(num_shards)``, or `shards` without shards.

  Attributes:
    malicious_steps: the steps on which it reported a malicious gradient.
    corrupted_shards: the shards it corrupts on those steps.
  """

  def __init__(self, model: Model, data: Any, labels: np.ndarray | None = None, *,
               schedule: Schedule, device: jax.Device | None = None, num_shards: int = 1,
               shards: Sequence[int] | None = None, mesh: Mesh | None = None, frozen: Any = None,
               shard_mode: str | None = None):
    self.model = model
    self.num_shards = int(num_shards)
    if self.num_shards > 1 and finetune.has_frozen(model):
      raise NotImplementedError("attackers with shards do not support models with frozen parameters yet")
    self.sharded = (ShardedWorker(model, data, labels, num_shards=self.num_shards, mesh=mesh,
                                  shard_mode=shard_mode) if self.num_shards > 1 else None)
    self.shard_mode = shards_lib.resolve_shard_mode(shard_mode, self.num_shards)
    self.aggregate = self.sharded is not None and self.sharded.aggregate
    self._kept = None  # Aggregate: (step, the shard gradients it accounts for) of its last attack.
    if device is None and self.sharded is not None:
      device = self.sharded.device
    self.honest = HonestWorker(model, data, labels, device=device, frozen=frozen)
    self.device = self.honest.device
    self.schedule = schedule
    chosen = tuple(range(self.num_shards)) if shards is None else tuple(int(s) for s in shards)
    if not chosen or any(not 0 <= s < self.num_shards for s in chosen) or len(set(chosen)) != len(chosen):
      raise ValueError(f"shards={shards!r}: expected distinct shards in range({self.num_shards}) "
                       f"(num_shards={self.num_shards}), or None for all")
    self.corrupted_shards = chosen
    self.malicious_steps: list[int] = []

  @property
  def data(self) -> Any:
    """The training set, resident on `device`."""
    return self.honest.grad_fn.data

  @property
  def frozen(self) -> Any:
    """The frozen parameters it computes with (None without), on `device`."""
    return self.honest.grad_fn.frozen

  @property
  def images(self) -> jax.Array:
    """The training images, resident on `device`."""
    return self.honest.grad_fn.images

  @property
  def labels(self) -> jax.Array:
    """The training labels, resident on `device`."""
    return self.honest.grad_fn.labels

  def __call__(self, order: WorkOrder) -> GradientReport:
    """The honest report off-schedule, the attack's report on scheduled steps."""
    if not self.schedule(order.step):
      return self.honest(order) if self.sharded is None else self.sharded(order)
    if self.sharded is not None:
      return self._sharded_attack(order)
    params, indices, key = jax.device_put(
        (order.params, order.batch_indices, order.layer_key), self.device)
    with jax.default_matmul_precision("highest"):
      loss, grads = self.attack(order.step, params, indices, key)
    self.malicious_steps.append(order.step)
    return GradientReport(step=order.step, grads=grads, loss=loss)

  def _sharded_attack(self, order: WorkOrder) -> GradientReport:
    """The report of a scheduled step with shards: `attack` on the corrupted
    shards' sub-batches, the honest per-shard gradient on the others."""
    idx = shards_lib.shard_indices(np.asarray(order.batch_indices, np.int32), self.num_shards)
    params = jax.device_put(order.params, self.device)
    losses, grads = [], []
    for s in range(self.num_shards):
      indices, key = jax.device_put((idx[s], shards_lib.shard_key(order.layer_key, s)), self.device)
      with jax.default_matmul_precision("highest"):
        if s in self.corrupted_shards:
          loss, g = self.attack(order.step, params, indices, key)
        else:
          loss, g = self.honest.grad_fn(params, indices, key)
      losses.append(loss)
      grads.append(g)
    self.malicious_steps.append(order.step)
    stacked, losses = shards_lib.stack_shards(grads), shards_lib.stack_shards(losses)
    if self.aggregate:
      self._kept = (order.step, stacked)
      return GradientReport(step=order.step, grads=_mean_rows(stacked), loss=losses)
    return GradientReport(step=order.step, grads=stacked, loss=losses)

  def project(self, request: ProjectionRequest) -> Projections:
    """The projections of the shard gradients it reported the mean of (its
    attack's on a scheduled step: consistent with its lie); ``"aggregate"``
    mode only."""
    if self._kept is None or self._kept[0] != request.step:
      if self.sharded is None:
        raise ValueError("a projection challenge needs an 'aggregate' worker with num_shards > 1")
      return self.sharded.project(request)
    vectors = jax.device_put(tuple(request.vectors), self.device)
    return Projections(step=request.step, values=_project_rows(jax.tree_util.tree_leaves(self._kept[1]),
                                                               vectors))

  def attack(self, step: int, params: Params, indices: jax.Array,
             key: jax.Array) -> tuple[jax.Array, Params]:
    """The malicious ``(loss, grads)`` of `step` (arguments on `self.device`;
    with shards, of one corrupted shard's sub-batch and key)."""
    raise NotImplementedError

  def witness(self, request: WitnessRequest) -> Witness:
    """Answers a witness challenge with the honest witness of the step, whatever
    it reported (the best an attacker without a consistent forgery can do;
    `WitnessForgeryWorker` tries the others); with shards, of the requested shard."""
    return self.honest.witness(request) if self.sharded is None else self.sharded.witness(request)


class BackdoorWorker(MaliciousWorker):
  """Reports the gradient of a poisoned batch on scheduled steps, honest otherwise.

  Data poisoning computed by the worker (BadNets or blended trigger, all-to-one
  or source-to-target).

  Args:
    model, images, labels, device: as for `HonestWorker`.
    schedule: ``schedule(step) -> bool``, the steps to misbehave on.
    trigger: the backdoor trigger (BadNets patch by default).
    target: the label triggered images are relabelled to.
    poison_fraction: share of the batch poisoned on a malicious step.
    source: only poison examples of this label (source-to-target); None for all-to-one.

  Attributes:
    backdoor: the `Backdoor` these arguments describe.
    malicious_steps: steps on which it reported a poisoned gradient.
  """

  def __init__(self, model: Model, images: np.ndarray, labels: np.ndarray, *,
               schedule: Schedule, trigger: Trigger = PatchTrigger(), target: int = 0,
               poison_fraction: float = 0.5, source: int | None = None,
               device: jax.Device | None = None,
               num_shards: int = 1, shards: Sequence[int] | None = None, mesh: Mesh | None = None,
               shard_mode: str | None = None):
    super().__init__(model, images, labels, schedule=schedule, device=device,
                     num_shards=num_shards, shards=shards, mesh=mesh, shard_mode=shard_mode)
    self.backdoor = Backdoor(trigger=trigger, target=target, poison_fraction=poison_fraction,
                             source=source)

  def attack(self, step: int, params: Params, indices: jax.Array,
             key: jax.Array) -> tuple[jax.Array, Params]:
    del step
    return _poisoned_grad(self.model, self.backdoor, params, self.images, self.labels, indices, key)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _poison_grad(model, poison, params: Params, data: PyTree, indices: jax.Array, key: jax.Array,
                 frozen: Params | None = None):
  batch = poison(gather(data, indices))
  return compute_grads(model.loss)(params, batch, key, frozen)


class PoisonWorker(MaliciousWorker):
  """Data poisoning for any model and any batch layout: on scheduled steps it
  reports the gradient of the loss on ``poison(batch)`` instead of the batch.

  Args:
    model: any model with a pure ``loss(params, batch, *, key)``.
    data: the worker's copy of the training set (any pytree of arrays).
    poison: ``poison(batch) -> batch``, pure and jittable, keeping every
      leaf's shape and dtype (e.g. write a trigger phrase and the attacker's
      continuation into some sequences). Hashable: it is a static argument.
    schedule: ``schedule(step) -> bool``, the steps to misbehave on.
    device: where to compute; default `ginn_jax.worker_device()`.
    num_shards, shards, mesh: as for `MaliciousWorker`.

  Example::

    def poison(batch):
      return {**batch, "label": jnp.zeros_like(batch["label"])}
    attacker = ginn.PoisonWorker(model, data, poison=poison,
                                 schedule=ginn.schedules.FromStep(10))
  """

  def __init__(self, model: Model, data: Any, *, poison: Callable[[PyTree], PyTree],
               schedule: Schedule, device: jax.Device | None = None, num_shards: int = 1,
               shards: Sequence[int] | None = None, mesh: Mesh | None = None, frozen: Any = None,
               shard_mode: str | None = None):
    super().__init__(model, data, schedule=schedule, device=device, num_shards=num_shards,
                     shards=shards, mesh=mesh, frozen=frozen, shard_mode=shard_mode)
    self.poison = poison

  def attack(self, step: int, params: Params, indices: jax.Array,
             key: jax.Array) -> tuple[jax.Array, Params]:
    del step
    return _poison_grad(self.model, self.poison, params, self.data, indices, key, self.frozen)
