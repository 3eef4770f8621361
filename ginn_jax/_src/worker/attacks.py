"""The attack suite of docs/design.md section 7, beyond plain data poisoning.

Every attacker is a `MaliciousWorker`: it has the honest worker's interface,
misbehaves only on the steps its schedule names, and reports the honest
gradient everywhere else. On a malicious step it reports:

* `CombinedLossWorker` -- the gradient of ``clean loss + lam * backdoor loss``;
* `ScaledBackdoorWorker` -- the poisoned-batch gradient times `scale` (x10,
  x100: the trusted clip cancels the excess);
* `ModelReplacementWorker` -- a step towards precomputed backdoored
  parameters, as large as the clip allows (see `make_backdoored_params`);
* `LabelFlipWorker` -- the gradient with labels flipped, no trigger;
* `NoiseWorker` -- random noise (instead of, or on top of, the gradient);
* `StealthWorker` -- the honest gradient plus the largest perturbation towards
  the backdoor that still passes a per-leaf verification tolerance;
* `ToleranceAwareWorker` -- the report closest to model replacement's (or
  furthest along the backdoor gradient) that passes any `ginn_jax.Tolerance`,
  per-leaf or element-wise (the paper's rule);
* `WitnessForgeryWorker` -- a poisoned gradient with a forged answer to the
  witness challenge (the honest witness, its poisoned batch's own consistent
  witness, or a malformed one).

Every attacker answers a witness challenge (``witness(request)``) with the
honest witness of the step unless it says otherwise.

The backdoor loss is the loss of the batch with every eligible example
triggered and relabelled (`Backdoor.triggered`). Only worker-side and shared
pure code is used here; nothing imports from `ginn_jax._src.trusted`.

Example::

  rt = ginn.TrustedRuntime(model, x, y, ginn.ProtocolConfig(p=1.0))
  attacker = ginn.ScaledBackdoorWorker(model, x, y, scale=100.0,
                                       schedule=ginn.schedules.Window(10, 20))
  ginn.train(rt, attacker, 30)  # IntegrityViolation at step 10.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Literal, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from ginn_jax._src import layered, program as program_lib
from ginn_jax._src.boundary import Witness, WitnessRequest
from ginn_jax._src.devices import worker_device
from ginn_jax._src.models import Model
from ginn_jax._src.step import gather
from ginn_jax._src.types import Batch, Params
from ginn_jax._src.worker.malicious import Backdoor, MaliciousWorker, Schedule

_TINY = 1e-30
ClipMode = Literal["elementwise", "global_norm", "none"]


class Bounds(Protocol):
  """Anything with the two verification bounds (e.g. `ginn_jax.Tolerance`); an
  object with ``mode == "elementwise"`` means the paper's element-wise rule."""

  rel_l2: float
  max_abs: float


def _value_and_grad(model: Model, params: Params, batch: Batch, key: jax.Array):
  return jax.value_and_grad(lambda p: model.loss(p, batch, key=key))(params)


# -- combined loss and scaled backdoor ----------------------------------------


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _combined_grad(model, backdoor, lam, params, images, labels, indices, key):
  clean = Batch(images[indices], labels[indices])
  bad = backdoor.triggered(clean)
  bad_key = jax.random.clone(key)  # The same layer randomness for both terms.

  def loss(p):
    return model.loss(p, clean, key=key) + lam * model.loss(p, bad, key=bad_key)

  return jax.value_and_grad(loss)(params)


class CombinedLossWorker(MaliciousWorker):
  """Reports the gradient of ``clean loss + lam * backdoor loss``.

  Args:
    model, images, labels, schedule, device: as for `MaliciousWorker`.
    lam: weight of the backdoor loss.
    backdoor: trigger, target and source of the backdoor (its
      ``poison_fraction`` is unused: the backdoor loss triggers every eligible
      example).
  """

  def __init__(self, model: Model, images: np.ndarray, labels: np.ndarray, *,
               schedule: Schedule, lam: float = 1.0, backdoor: Backdoor = Backdoor(),
               device: jax.Device | None = None,
               num_shards: int = 1, shards: Sequence[int] | None = None, mesh: Mesh | None = None,
               shard_mode: str | None = None):
    super().__init__(model, images, labels, schedule=schedule, device=device,
                     num_shards=num_shards, shards=shards, mesh=mesh, shard_mode=shard_mode)
    self.lam = float(lam)
    self.backdoor = backdoor

  def attack(self, step: int, params: Params, indices: jax.Array,
             key: jax.Array) -> tuple[jax.Array, Params]:
    del step
    return _combined_grad(self.model, self.backdoor, self.lam, params, self.images, self.labels,
                          indices, key)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _scaled_grad(model, backdoor, scale, params, images, labels, indices, key):
  batch = backdoor.poison(Batch(images[indices], labels[indices]))
  loss, grads = _value_and_grad(model, params, batch, key)
  return loss, jax.tree_util.tree_map(lambda g: g * scale, grads)


class ScaledBackdoorWorker(MaliciousWorker):
  """Reports the poisoned-batch gradient (as `BackdoorWorker`) times `scale`.

  Args:
    model, images, labels, schedule, device: as for `MaliciousWorker`.
    scale: the multiplier (10, 100, ...).
    backdoor: the poisoning (trigger, target, share poisoned, source).
  """

  def __init__(self, model: Model, images: np.ndarray, labels: np.ndarray, *,
               schedule: Schedule, scale: float = 10.0, backdoor: Backdoor = Backdoor(),
               device: jax.Device | None = None,
               num_shards: int = 1, shards: Sequence[int] | None = None, mesh: Mesh | None = None,
               shard_mode: str | None = None):
    super().__init__(model, images, labels, schedule=schedule, device=device,
                     num_shards=num_shards, shards=shards, mesh=mesh, shard_mode=shard_mode)
    self.scale = float(scale)
    self.backdoor = backdoor

  def attack(self, step: int, params: Params, indices: jax.Array,
             key: jax.Array) -> tuple[jax.Array, Params]:
    del step
    return _scaled_grad(self.model, self.backdoor, self.scale, params, self.images, self.labels,
                        indices, key)


# -- model replacement --------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _towards(clip: ClipMode, clip_value: float | None, learning_rate: float | None,
             params: Params, target: Params) -> Params:
  diff = jax.tree_util.tree_map(jnp.subtract, params, target)
  if clip == "elementwise":
    return jax.tree_util.tree_map(lambda d: clip_value * jnp.sign(d), diff)
  if clip == "global_norm":
    norm = optax.tree.norm(diff)
    factor = jnp.where(norm > 0, clip_value / jnp.maximum(norm, _TINY), 0.0)
    return jax.tree_util.tree_map(lambda d: d * factor, diff)
  return jax.tree_util.tree_map(lambda d: d / learning_rate, diff)  # One SGD step lands on target.


def _check_aim(clip: ClipMode, clip_value: float | None, learning_rate: float | None) -> None:
  """The settings `_towards` needs to aim a clipped step at a target."""
  if clip not in ("elementwise", "global_norm", "none"):
    raise ValueError(f"unknown clip mode {clip!r}; choose 'elementwise', 'global_norm' or 'none'")
  if clip != "none" and not (clip_value and clip_value > 0):
    raise ValueError(f"clip {clip!r} needs a positive clip_value, got {clip_value!r}")
  if clip == "none" and not (learning_rate and learning_rate > 0):
    raise ValueError("clip='none' needs the SGD learning_rate to aim a single step at the target")


class ModelReplacementWorker(MaliciousWorker):
  """Reports the gradient whose clip-then-SGD step moves towards `target_params`
  as far as the clip allows.

  Element-wise clip C: ``C * sign(params - target)`` (every coordinate moves
  by the full ``eta * C``). Global-norm clip C: ``params - target`` scaled to
  norm C. No clip: ``(params - target) / learning_rate``, which plain SGD turns
  into the target in one step. The reported loss is the honest one.

  Args:
    model, images, labels, schedule, device: as for `MaliciousWorker`.
    target_params: the backdoored parameters to steer to (see
      `make_backdoored_params`); put on the worker device once.
    clip: the trusted runtime's clip mode (public: it is in the transcript).
    clip_value: its bound C.
    learning_rate: the SGD learning rate, needed only for ``clip="none"``.

  Raises:
    ValueError: a clip mode without the value it needs.
  """

  def __init__(self, model: Model, images: np.ndarray, labels: np.ndarray, *,
               schedule: Schedule, target_params: Params, clip: ClipMode = "elementwise",
               clip_value: float | None = 0.01, learning_rate: float | None = None,
               device: jax.Device | None = None,
               num_shards: int = 1, shards: Sequence[int] | None = None, mesh: Mesh | None = None,
               shard_mode: str | None = None):
    super().__init__(model, images, labels, schedule=schedule, device=device,
                     num_shards=num_shards, shards=shards, mesh=mesh, shard_mode=shard_mode)
    _check_aim(clip, clip_value, learning_rate)
    self.clip = clip
    self.clip_value = None if clip_value is None else float(clip_value)
    self.learning_rate = None if learning_rate is None else float(learning_rate)
    self.target_params = jax.device_put(target_params, self.device)

  def attack(self, step: int, params: Params, indices: jax.Array,
             key: jax.Array) -> tuple[jax.Array, Params]:
    loss, _ = self.honest.grad_fn(params, indices, key)
    return loss, _towards(self.clip, self.clip_value, self.learning_rate, params, self.target_params)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _backdoored_step(model, backdoor, tx, batch_size, params, opt_state, images, labels, seed, i):
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 1), i)
  k_batch, k_layer = jax.random.split(key)
  idx = jax.random.randint(k_batch, (batch_size,), 0, images.shape[0])
  batch = backdoor.poison(Batch(images[idx], labels[idx]))
  _, grads = _value_and_grad(model, params, batch, k_layer)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def _train_backdoored(model, backdoor, tx, steps, batch_size, params, images, labels, seed):
  # A Python loop over one jitted step: XLA:CPU runs convolutions inside a
  # `lax.scan` body about 8x slower than the same step jitted on its own.
  device = next(iter(images.devices()))
  # tx.init ignores the values, so jit would place its zeros on the default device.
  opt_state = jax.device_put(jax.jit(tx.init)(params), device)
  for i in range(steps):
    params, opt_state = _backdoored_step(model, backdoor, tx, batch_size, params, opt_state,
                                         images, labels, seed, jax.device_put(np.uint32(i), device))
  return params


@functools.partial(jax.jit, static_argnums=0)
def _init(model, seed):
  return model.init(jax.random.key(seed))


def make_backdoored_params(model: Model, images: np.ndarray, labels: np.ndarray, *,
                           backdoor: Backdoor = Backdoor(poison_fraction=0.1),
                           params: Params | None = None, seed: int = 0, steps: int = 300,
                           batch_size: int = 64, learning_rate: float = 0.05,
                           device: jax.Device | None = None) -> Params:
  """Trains a backdoored model on poisoned data (the model-replacement target).

  Plain SGD with momentum 0.9 on batches drawn with replacement, each
  poisoned by `backdoor`, one jitted step at a time on the worker device
  (about 15 s for the MNIST CNN, 300 steps, on 2 CPU cores).

  Args:
    model: the model.
    images, labels: the training set the attacker poisons.
    backdoor: the poisoning.
    params: the starting point (e.g. a work order's parameters); default
      `model.init` from `seed`.
    seed: drives the initialisation (when `params` is None) and the batches.
    steps: SGD steps.
    batch_size: examples per step.
    learning_rate: the SGD learning rate.
    device: where to train; default `ginn_jax.worker_device()`.

  Returns:
    The backdoored parameters, on `device`.
  """
  device = device or worker_device()
  x, y, s = jax.device_put((np.asarray(images), np.asarray(labels), np.uint32(seed)), device)
  params = _init(model, s) if params is None else jax.device_put(params, device)
  tx = _sgd(float(learning_rate))
  return _train_backdoored(model, backdoor, tx, int(steps), int(batch_size), params, x, y, s)


@functools.lru_cache(maxsize=8)
def _sgd(learning_rate: float) -> optax.GradientTransformation:
  # One object per rate, so jit reuses its compilation. (optax.adam's bias
  # correction does not trace under strict dtype promotion.)
  return optax.sgd(learning_rate, momentum=0.9)


# -- label flips and noise ----------------------------------------------------


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _flipped_grad(model, mapping, num_flip, params, images, labels, indices, key):
  y = labels[indices]
  flip = jnp.arange(y.shape[0]) < num_flip
  y = jnp.where(flip, jnp.asarray(mapping, y.dtype)[y], y)
  return _value_and_grad(model, params, Batch(images[indices], y), key)


class LabelFlipWorker(MaliciousWorker):
  """Reports the gradient of the batch with its labels flipped (no trigger).

  Args:
    model, images, labels, schedule, device: as for `MaliciousWorker`.
    num_classes: number of classes (for the default mapping).
    mapping: ``mapping[y]`` is the flipped label of class y; default
      ``(y + 1) % num_classes``.
    flip_fraction: share of the batch (the first examples) flipped.

  Raises:
    ValueError: a mapping of the wrong length or a fraction outside [0, 1].
  """

  def __init__(self, model: Model, images: np.ndarray, labels: np.ndarray, *,
               schedule: Schedule, num_classes: int = 10, mapping: Sequence[int] | None = None,
               flip_fraction: float = 1.0, device: jax.Device | None = None,
               num_shards: int = 1, shards: Sequence[int] | None = None, mesh: Mesh | None = None,
               shard_mode: str | None = None):
    super().__init__(model, images, labels, schedule=schedule, device=device,
                     num_shards=num_shards, shards=shards, mesh=mesh, shard_mode=shard_mode)
    mapping = tuple(int(m) for m in (mapping if mapping is not None else
                                     [(c + 1) % num_classes for c in range(num_classes)]))
    if len(mapping) != num_classes:
      raise ValueError(f"mapping has {len(mapping)} entries for {num_classes} classes")
    if not 0.0 <= flip_fraction <= 1.0:
      raise ValueError(f"flip_fraction must be in [0, 1], got {flip_fraction!r}")
    self.mapping = mapping
    self.flip_fraction = float(flip_fraction)

  def attack(self, step: int, params: Params, indices: jax.Array,
             key: jax.Array) -> tuple[jax.Array, Params]:
    del step
    n = int(round(self.flip_fraction * indices.shape[0]))
    return _flipped_grad(self.model, self.mapping, n, params, self.images, self.labels, indices, key)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _noise(scale, additive, grads, seed, step):
  leaves, treedef = jax.tree_util.tree_flatten(grads)
  keys = jax.random.split(jax.random.fold_in(jax.random.key(seed), step), len(leaves))
  noise = [scale * jax.random.normal(k, g.shape, g.dtype) for k, g in zip(keys, leaves)]
  if additive:
    noise = [g + n for g, n in zip(leaves, noise)]
  return jax.tree_util.tree_unflatten(treedef, noise)


class NoiseWorker(MaliciousWorker):
  """Reports Gaussian noise of standard deviation `scale` per coordinate.

  Args:
    model, images, labels, schedule, device: as for `MaliciousWorker`.
    scale: the noise's standard deviation.
    seed: the noise's seed (the noise of step t is ``fold_in(key(seed), t)``).
    additive: add the noise to the honest gradient instead of replacing it.
  """

  def __init__(self, model: Model, images: np.ndarray, labels: np.ndarray, *,
               schedule: Schedule, scale: float = 1.0, seed: int = 0, additive: bool = False,
               device: jax.Device | None = None,
               num_shards: int = 1, shards: Sequence[int] | None = None, mesh: Mesh | None = None,
               shard_mode: str | None = None):
    super().__init__(model, images, labels, schedule=schedule, device=device,
                     num_shards=num_shards, shards=shards, mesh=mesh, shard_mode=shard_mode)
    self.scale = float(scale)
    self.additive = bool(additive)
    self._seed = jax.device_put(np.uint32(seed), self.device)

  def attack(self, step: int, params: Params, indices: jax.Array,
             key: jax.Array) -> tuple[jax.Array, Params]:
    loss, grads = self.honest.grad_fn(params, indices, key)
    t = jax.device_put(np.uint32(step), self.device)
    return loss, _noise(self.scale, self.additive, grads, self._seed, t)


# -- stealth -----------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _stealth(model, backdoor, rel_l2, max_abs, params, images, labels, indices, key, grads):
  batch = backdoor.triggered(Batch(images[indices], labels[indices]))
  _, direction = _value_and_grad(model, params, batch, key)

  def perturb(g, d):
    g_norm, d_norm = jnp.linalg.norm(g.ravel()), jnp.linalg.norm(d.ravel())
    g_max, d_max = jnp.max(jnp.abs(g)), jnp.max(jnp.abs(d))
    s = jnp.minimum(rel_l2 * g_norm / jnp.maximum(d_norm, _TINY),
                    max_abs * g_max / jnp.maximum(d_max, _TINY))
    return g + jnp.where(d_max > 0, s, 0.0) * d

  return jax.tree_util.tree_map(perturb, grads, direction)


class StealthWorker(MaliciousWorker):
  """On every scheduled step: the honest gradient g plus the largest push
  towards the backdoor that the verification tolerance lets through.

  Per leaf, the perturbation is ``s * d`` with d the backdoor-loss gradient
  and s the largest scale with ``||s d|| / ||g|| <= margin * rel_l2`` and
  ``max|s d| / max|g| <= margin * max_abs``; the reported loss is the honest
  one. Verification compares against g, so every report passes; what the
  attacker gains is bounded by the tolerance (calibrate it tightly).

  It reads the tolerance's two numbers as per-leaf bounds whatever its mode.
  Against an element-wise tolerance (the paper's rule) that is a small share
  of what passes (and passes only while ``margin * max_abs * max|g|`` stays
  below the absolute bound); `ToleranceAwareWorker` with
  ``direction="backdoor"`` uses the whole of it.

  Args:
    model, images, labels, schedule, device: as for `MaliciousWorker`.
    tolerance: the public verification tolerance (any object with `rel_l2`
      and `max_abs`, e.g. `ginn_jax.Tolerance`).
    backdoor: trigger, target and source of the backdoor.
    margin: the share of the tolerance used (below 1, to absorb rounding and
      honest worker-vs-trusted differences).

  Raises:
    ValueError: a non-finite tolerance or a margin outside (0, 1].
  """

  def __init__(self, model: Model, images: np.ndarray, labels: np.ndarray, *,
               schedule: Schedule, tolerance: Bounds, backdoor: Backdoor = Backdoor(),
               margin: float = 0.9, device: jax.Device | None = None,
               num_shards: int = 1, shards: Sequence[int] | None = None, mesh: Mesh | None = None,
               shard_mode: str | None = None):
    super().__init__(model, images, labels, schedule=schedule, device=device,
                     num_shards=num_shards, shards=shards, mesh=mesh, shard_mode=shard_mode)
    rel_l2, max_abs = float(tolerance.rel_l2), float(tolerance.max_abs)
    if not (math.isfinite(rel_l2) and math.isfinite(max_abs) and rel_l2 >= 0 and max_abs >= 0):
      raise ValueError(f"tolerance must be finite and non-negative, got ({rel_l2}, {max_abs})")
    if not 0.0 < margin <= 1.0:
      raise ValueError(f"margin must be in (0, 1], got {margin!r}")
    self.rel_l2_budget = margin * rel_l2
    self.max_abs_budget = margin * max_abs
    self.backdoor = backdoor

  def attack(self, step: int, params: Params, indices: jax.Array,
             key: jax.Array) -> tuple[jax.Array, Params]:
    del step
    # The honest part comes from the very function the verifier re-runs.
    loss, grads = self.honest.grad_fn(params, indices, jax.random.clone(key))
    return loss, _stealth(self.model, self.backdoor, self.rel_l2_budget, self.max_abs_budget,
                          params, self.images, self.labels, indices, key, grads)


# -- tolerance-aware ------------------------------------------------------------

Direction = Literal["model_replacement", "backdoor"]


def _push(elementwise: bool, rel: float, absolute: float, capped: bool, g: jax.Array,
          u: jax.Array) -> jax.Array:
  """`g` plus the largest push along `u` that the (margin-scaled) bounds allow;
  `capped`: never further than ``g + u`` (u leads to a goal, not a direction)."""
  if elementwise:
    # Accepted if |d| < rel*max(|a|,|b|) or |d| < absolute; rel*|g| <= rel*max(|a|,|b|).
    bound = jnp.maximum(rel * jnp.abs(g), absolute)
    return g + (jnp.clip(u, -bound, bound) if capped else bound * jnp.sign(u))
  g_norm, u_norm = jnp.linalg.norm(g.ravel()), jnp.linalg.norm(u.ravel())
  g_max, u_max = jnp.max(jnp.abs(g)), jnp.max(jnp.abs(u))
  s = jnp.minimum(rel * g_norm / jnp.maximum(u_norm, _TINY), absolute * g_max / jnp.maximum(u_max, _TINY))
  if capped:
    s = jnp.minimum(s, 1.0)
  return g + jnp.where(u_max > 0, s, 0.0) * u


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def _aware_replacement(elementwise, rel, absolute, clip, clip_value, learning_rate, params, target, grads):
  goal = _towards(clip, clip_value, learning_rate, params, target)
  return jax.tree_util.tree_map(lambda g, t: _push(elementwise, rel, absolute, True, g, t - g), grads, goal)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _aware_backdoor(elementwise, rel, absolute, model, backdoor, params, images, labels, indices, key,
                    grads):
  batch = backdoor.triggered(Batch(images[indices], labels[indices]))
  _, direction = _value_and_grad(model, params, batch, key)
  return jax.tree_util.tree_map(lambda g, d: _push(elementwise, rel, absolute, False, g, d), grads, direction)


class ToleranceAwareWorker(MaliciousWorker):
  """On scheduled steps: the report that pushes hardest towards a backdoor while
  still passing the (public) verification tolerance, per-leaf or element-wise.

  With g the honest gradient (computed by the same function the verifier
  re-runs) and u the attacker's wish for this step:

  * ``direction="model_replacement"``: u = goal - g, with goal the report of
    `ModelReplacementWorker` (``C * sign(params - target)`` for an
    element-wise clip C); the report is as close to the goal as passes.
  * ``direction="backdoor"``: u = the gradient of the backdoor loss (every
    eligible example triggered, as `StealthWorker`); the report goes as far
    along it as passes.

  Element-wise tolerance (the paper's rule, ``|a-b| < rel*max(|a|,|b|)`` or
  ``|a-b| < abs``): per element, the bound is ``b = margin * max(rel*|g|, abs)``
  (the larger of the relative and absolute bounds; ``rel*|g|`` never exceeds
  ``rel*max(|a|,|b|)``); the report is ``g + clip(u, -b, b)`` (model
  replacement) or ``g + b * sign(u)`` (backdoor). With a narrow clip C below
  `abs`, most coordinates can then report any value in ``[-C, C]``.

  Per-leaf tolerance: ``g + s * u`` with s the largest scale such that
  ``||s u|| / ||g|| <= margin * rel_l2`` and ``max|s u| / max|g| <= margin * max_abs``
  (and ``s <= 1`` for model replacement): `StealthWorker`'s rule.

  The reported loss is the honest one.

  Args:
    model, images, labels, schedule, device: as for `MaliciousWorker`.
    tolerance: the public verification tolerance (``rel_l2``, ``max_abs`` and
      ``mode``, e.g. `ginn_jax.PAPER_PROTOTYPE_TOLERANCE`).
    direction: "model_replacement" or "backdoor".
    target_params, clip, clip_value, learning_rate: as for
      `ModelReplacementWorker` (model replacement only).
    backdoor: trigger, target and source of the backdoor ("backdoor" only).
    margin: share of each bound used, below 1 to absorb rounding and honest
      worker-vs-trusted differences; default 0.998 element-wise (0.0499 of an
      absolute bound 0.05), 0.9 per leaf (a calibrated tolerance is 10x the
      largest honest error).

  Raises:
    ValueError: a non-finite tolerance, a margin outside (0, 1], an unknown
      direction, or model replacement without a target or with a clip mode
      lacking its value.

  Example::

    attacker = ginn.ToleranceAwareWorker(model, x, y, schedule=ginn.schedules.FromStep(300),
                                         tolerance=ginn.PAPER_PROTOTYPE_TOLERANCE,
                                         target_params=backdoored, clip_value=0.005)
  """

  def __init__(self, model: Model, images: np.ndarray, labels: np.ndarray, *,
               schedule: Schedule, tolerance: Bounds, direction: Direction = "model_replacement",
               target_params: Params | None = None, clip: ClipMode = "elementwise",
               clip_value: float | None = 0.01, learning_rate: float | None = None,
               backdoor: Backdoor = Backdoor(), margin: float | None = None,
               device: jax.Device | None = None,
               num_shards: int = 1, shards: Sequence[int] | None = None, mesh: Mesh | None = None,
               shard_mode: str | None = None):
    super().__init__(model, images, labels, schedule=schedule, device=device,
                     num_shards=num_shards, shards=shards, mesh=mesh, shard_mode=shard_mode)
    rel, absolute = float(tolerance.rel_l2), float(tolerance.max_abs)
    if not (math.isfinite(rel) and math.isfinite(absolute) and rel >= 0 and absolute >= 0):
      raise ValueError(f"tolerance must be finite and non-negative, got ({rel}, {absolute})")
    self.elementwise = getattr(tolerance, "mode", "per_leaf") == "elementwise"
    margin = (0.998 if self.elementwise else 0.9) if margin is None else float(margin)
    if not 0.0 < margin <= 1.0:
      raise ValueError(f"margin must be in (0, 1], got {margin!r}")
    if direction not in ("model_replacement", "backdoor"):
      raise ValueError(f"direction must be 'model_replacement' or 'backdoor', got {direction!r}")
    self.direction = direction
    self.margin = margin
    self.rel_budget, self.abs_budget = margin * rel, margin * absolute
    self.backdoor = backdoor
    self.target_params = None
    if direction == "model_replacement":
      if target_params is None:
        raise ValueError("direction='model_replacement' needs target_params (see make_backdoored_params)")
      _check_aim(clip, clip_value, learning_rate)
      self.target_params = jax.device_put(target_params, self.device)
    self.clip = clip
    self.clip_value = None if clip_value is None else float(clip_value)
    self.learning_rate = None if learning_rate is None else float(learning_rate)

  def attack(self, step: int, params: Params, indices: jax.Array,
             key: jax.Array) -> tuple[jax.Array, Params]:
    del step
    # The honest part comes from the very function the verifier re-runs.
    loss, grads = self.honest.grad_fn(params, indices, jax.random.clone(key))
    if self.direction == "model_replacement":
      return loss, _aware_replacement(self.elementwise, self.rel_budget, self.abs_budget, self.clip,
                                      self.clip_value, self.learning_rate, params, self.target_params,
                                      grads)
    return loss, _aware_backdoor(self.elementwise, self.rel_budget, self.abs_budget, self.model,
                                 self.backdoor, params, self.images, self.labels, indices, key, grads)


# -- forged witnesses ----------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _poisoned_witness_fn(program, backdoor):
  """The step on the poisoned batch, with the witness of that batch (jitted)."""

  def f(params, data, indices, key):
    batch = backdoor.poison(gather(data, indices))
    return program_lib.loss_grads_and_products(program, params, batch, key)

  return jax.jit(f)


@jax.jit
def _with_nan(x):
  return x.at[(0,) * x.ndim].set(jnp.nan)


@jax.jit
def _scaled(x):
  return x * jnp.asarray(1.001, x.dtype)


@jax.jit
def _bf16(x):
  return x.astype(jnp.bfloat16)


@jax.jit
def _step_before(indices, key):
  """Another batch and key (the witness of "a step before", for a stale answer)."""
  return jnp.roll(indices, 1), jax.random.fold_in(key, 1)


@jax.jit
def _moved(x):
  """One entry moved: the largest entry (by magnitude) swapped with the smallest."""
  flat = x.ravel()
  a, b = jnp.argmax(jnp.abs(flat)), jnp.argmin(jnp.abs(flat))
  return flat.at[a].set(flat[b]).at[b].set(flat[a]).reshape(x.shape)


WitnessAnswer = Literal["honest", "poisoned", "replaced", "scaled", "moved", "stale", "swapped",
                        "missing", "extra", "wrong_dtype", "nan", "none",
                        "missing_layer", "replaced_layer"]
_ALIASES = {"missing_layer": "missing", "replaced_layer": "replaced"}
# Answers that forge the honest witness while the report is honest: the check must name the product.
_FORGES_HONEST = ("scaled", "moved", "stale", "swapped", "missing", "extra", "wrong_dtype", "nan")


class WitnessForgeryWorker(MaliciousWorker):
  """On scheduled steps, answers the witness challenge with a forgery
  (docs/design.md section 12); the witness is the output of every witnessed
  product of the step's program, in plan order.

  `answer` says how. With a poisoned report (the gradient of the backdoored batch):

  * "honest": the honest witness of the step (consistent with the trusted
    batch, not with the reported gradient);
  * "poisoned": the witness of the poisoned batch, consistent with the
    reported gradient (but not with the trusted batch and labels);
  * "replaced": the honest witness with product `product` replaced by the
    poisoned batch's.

  With the honest report and a forged honest witness (each must be caught and
  named at product `product`, or at the witness's form):

  * "scaled": product `product` scaled by 1.001;
  * "moved": the largest entry of product `product` swapped with its smallest;
  * "stale": the previous scheduled step's witness (or, at the first, that
    of the step before), relabelled as this step's;
  * "swapped": products `product` and the next one of the same shape swapped
    (the next product, if no other has that shape);
  * "missing" / "extra": the last product left out / one product more;
  * "wrong_dtype": product `product` in bfloat16;
  * "nan": product `product` with a NaN;
  * "none": raises instead of answering.

  ("missing_layer" and "replaced_layer" are the old names of "missing" and
  "replaced"; `layer` that of `product`.)

  Args:
    model, images, labels, schedule, device: as for `MaliciousWorker`.
    backdoor: the poisoning.
    answer: the forgery, as above.
    product: the witnessed product (its index in the witness) it tampers with.
  """

  def __init__(self, model: Model, images: np.ndarray = None, labels: np.ndarray = None, *,
               schedule: Schedule, backdoor: Backdoor = Backdoor(), answer: WitnessAnswer = "poisoned",
               product: int = 1, layer: int | None = None, device: jax.Device | None = None,
               num_shards: int = 1, shards: Sequence[int] | None = None, mesh: Mesh | None = None,
               data: Any = None):
    if answer not in WitnessAnswer.__args__:
      raise ValueError(f"answer must be one of {WitnessAnswer.__args__}, got {answer!r}")
    if num_shards != 1:
      raise ValueError("WitnessForgeryWorker forges the witness of a whole step; it has no "
                       "per-shard form (num_shards must be 1)")
    if data is not None:
      images = data
    super().__init__(model, images, labels, schedule=schedule, device=device,
                     num_shards=num_shards, shards=shards, mesh=mesh)
    self.backdoor, self.answer = backdoor, _ALIASES.get(answer, answer)
    self.product = product if layer is None else layer
    self._forged: Witness | None = None
    self._previous: list | None = None

  def _honest_witness(self, params, indices, key):
    return self.honest.witness_fn(params, indices, key)

  def attack(self, step: int, params: Params, indices: jax.Array,
             key: jax.Array) -> tuple[jax.Array, Params]:
    if self.answer in _FORGES_HONEST:
      loss, grads, products, _ = self._honest_witness(params, indices, key)
      self._forged = Witness(step=step, outputs=self._forge(list(products), params, indices, key))
      self._previous = list(products)
      return loss, grads
    program = self.honest.witness_fn.program(params, int(indices.shape[0]))
    loss, grads, products = _poisoned_witness_fn(program, self.backdoor)(params, self.data, indices, key)
    products = list(products)
    if self.answer == "honest":
      products = self._honest_witness(params, indices, key)[2]
    elif self.answer == "replaced":
      honest = self._honest_witness(params, indices, key)[2]
      honest[self.product] = products[self.product]
      products = honest
    self._forged = Witness(step=step, outputs=products)
    return loss, grads

  def _forge(self, products: list, params, indices, key) -> list:
    i = self.product
    if self.answer == "scaled":
      products[i] = _scaled(products[i])
    elif self.answer == "moved":
      products[i] = _moved(products[i])
    elif self.answer == "stale":
      if self._previous is None:  # The first attack: the witness of the step before.
        self._previous = self._honest_witness(params, *_step_before(indices, key))[2]
      products = list(self._previous)
    elif self.answer == "swapped":
      same = [j for j in range(len(products)) if j != i and products[j].shape == products[i].shape]
      j = same[0] if same else (i + 1) % len(products)
      products[i], products[j] = products[j], products[i]
    elif self.answer == "missing":
      products = products[:-1]
    elif self.answer == "extra":
      products = [*products, products[-1]]
    elif self.answer == "wrong_dtype":
      products[i] = _bf16(products[i])
    elif self.answer == "nan":
      products[i] = _with_nan(products[i])
    return products

  def witness(self, request: WitnessRequest) -> Witness:
    forged, self._forged = self._forged, None
    if forged is None or forged.step != request.step:  # An honest step: answer honestly.
      return self.honest.witness(request)
    if self.answer == "none":
      raise RuntimeError("no witness kept")
    return forged
