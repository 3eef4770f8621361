"""The trusted update: one optax chain, clip first (docs/design.md section 4, 4).

The chain is a `named_chain` so its parts read by name: ``clip`` then
``optimizer``. The worker never applies an update and cannot skip the clip.

The ``optimizer`` part is an `OptimizerConfig` (SGD with momentum and weight
decay, the analysed case), an `OptimizerSpec` (a named optax optimizer with its
hyperparameters and learning-rate schedule, recorded in a run's header so a
resume or an audit rebuilds it), or, for a run that is not persisted, any
optax transformation.

With S > 1 shards (docs/design.md, "Shards") the gradient has a leading shard
axis and the chain is ``clip_shards`` (the clip applied to each shard on its
own, `clip_each_shard`), ``mean_shards`` (the mean over the shard axis,
`mean_over_shards`), then ``optimizer``: each shard is clipped *before* the
average, so one shard moves any coordinate of the mean by at most 2C/S.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any, Callable, Literal, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

ClipMode = Literal["elementwise", "global_norm", "none"]


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """SGD with momentum and decoupled-into-the-gradient weight decay.

  The header of a run made with it records these three fields (as before
  `OptimizerSpec` existed). For another optimizer or a learning-rate schedule,
  use an `OptimizerSpec`.

  Attributes:
    learning_rate: eta (constant).
    momentum: heavy-ball momentum m (0 disables it).
    weight_decay: L2 coefficient added to the clipped gradient, as in the
      paper's PyTorch code (``g + wd * params``), computed by the trusted side.
  """

  learning_rate: float = 0.05
  momentum: float = 0.9
  weight_decay: float = 5e-4


_REQUIRED = object()


@dataclasses.dataclass(frozen=True)
class _Hyper:
  """One hyperparameter: its kind ("float", "int", "bool", "optional_float" or
  "learning_rate": a float or a schedule), default and allowed range."""

  kind: str
  default: Any = _REQUIRED
  low: float = -math.inf
  high: float = math.inf
  low_open: bool = False
  high_open: bool = False

  def range_text(self) -> str:
    lo = "" if self.low == -math.inf else f"{'>' if self.low_open else '>='} {self.low:g}"
    hi = "" if self.high == math.inf else f"{'<' if self.high_open else '<='} {self.high:g}"
    return " and ".join(x for x in (lo, hi) if x)

  def check(self, value: Any, where: str) -> Any:
    """`value` in its canonical type (float for a float, so 1 and 1.0 are one
    spec); raises TypeError (wrong type) or ValueError (out of range)."""
    if self.kind == "bool":
      if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{where} must be a bool, got {value!r}")
      return bool(value)
    if self.kind == "optional_float" and value is None:
      return None
    if self.kind == "int":
      if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{where} must be an int, got {value!r}")
      value = int(value)
    else:
      if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where} must be a {'float or None' if self.kind == 'optional_float' else 'float'}, "
                        f"got {value!r}")
      value = float(value)
      if not math.isfinite(value):
        raise ValueError(f"{where} must be finite, got {value!r}")
    if (value < self.low or (self.low_open and value == self.low) or value > self.high
        or (self.high_open and value == self.high)):
      raise ValueError(f"{where} must be {self.range_text()}, got {value!r}")
    return value


_UNIT = dict(low=0.0, high=1.0, high_open=True)  # [0, 1)
_POSITIVE = dict(low=0.0, low_open=True)  # > 0
_NON_NEGATIVE = dict(low=0.0)  # >= 0
_LEARNING_RATE = _Hyper("learning_rate")

OPTIMIZERS: Mapping[str, Mapping[str, _Hyper]] = {
    "sgd": {"learning_rate": _LEARNING_RATE, "weight_decay": _Hyper("float", 0.0, **_NON_NEGATIVE)},
    "momentum": {"learning_rate": _LEARNING_RATE, "momentum": _Hyper("float", 0.9, **_UNIT),
                 "weight_decay": _Hyper("float", 0.0, **_NON_NEGATIVE)},
    "adam": {"learning_rate": _LEARNING_RATE, "b1": _Hyper("float", 0.9, **_UNIT),
             "b2": _Hyper("float", 0.999, **_UNIT), "eps": _Hyper("float", 1e-8, **_POSITIVE)},
    "adamw": {"learning_rate": _LEARNING_RATE, "b1": _Hyper("float", 0.9, **_UNIT),
              "b2": _Hyper("float", 0.999, **_UNIT), "eps": _Hyper("float", 1e-8, **_POSITIVE),
              "weight_decay": _Hyper("float", 1e-4, **_NON_NEGATIVE)},
    "rmsprop": {"learning_rate": _LEARNING_RATE, "decay": _Hyper("float", 0.9, **_UNIT),
                "eps": _Hyper("float", 1e-8, **_POSITIVE), "centered": _Hyper("bool", False)},
    "lion": {"learning_rate": _LEARNING_RATE, "b1": _Hyper("float", 0.9, **_UNIT),
             "b2": _Hyper("float", 0.99, **_UNIT), "weight_decay": _Hyper("float", 1e-3, **_NON_NEGATIVE)},
}
"""The optimizers an `OptimizerSpec` can name, with their hyperparameters
(a missing one takes the default shown; ``learning_rate`` has none)."""

SCHEDULES: Mapping[str, Mapping[str, _Hyper]] = {
    "constant": {"value": _Hyper("float", **_NON_NEGATIVE)},
    "cosine_decay": {"init_value": _Hyper("float", **_NON_NEGATIVE),
                     "decay_steps": _Hyper("int", low=1),
                     "alpha": _Hyper("float", 0.0, low=0.0, high=1.0),
                     "exponent": _Hyper("float", 1.0, **_POSITIVE)},
    "warmup_cosine_decay": {"init_value": _Hyper("float", **_NON_NEGATIVE),
                            "peak_value": _Hyper("float", **_NON_NEGATIVE),
                            "warmup_steps": _Hyper("int", low=0),
                            "decay_steps": _Hyper("int", low=1),
                            "end_value": _Hyper("float", 0.0, **_NON_NEGATIVE),
                            "exponent": _Hyper("float", 1.0, **_POSITIVE)},
    "exponential_decay": {"init_value": _Hyper("float", **_NON_NEGATIVE),
                          "transition_steps": _Hyper("int", low=1),
                          "decay_rate": _Hyper("float", **_POSITIVE),
                          "transition_begin": _Hyper("int", 0, low=0),
                          "staircase": _Hyper("bool", False),
                          "end_value": _Hyper("optional_float", None, **_NON_NEGATIVE)},
    "linear": {"init_value": _Hyper("float", **_NON_NEGATIVE),
               "end_value": _Hyper("float", **_NON_NEGATIVE),
               "transition_steps": _Hyper("int", low=1),
               "transition_begin": _Hyper("int", 0, low=0)},
}
"""Learning-rate schedules by name: ``{"schedule": NAME, **arguments}`` is
``optax.<NAME>_schedule(**arguments)`` (``exponential_decay``:
``optax.exponential_decay``), the step being the optimizer's own count of
updates."""

_SCHEDULE_FNS: Mapping[str, Callable[..., optax.Schedule]] = {
    "constant": optax.constant_schedule,
    "cosine_decay": optax.cosine_decay_schedule,
    "warmup_cosine_decay": optax.warmup_cosine_decay_schedule,
    "exponential_decay": optax.exponential_decay,
    "linear": optax.linear_schedule,
}


def _check_args(table: Mapping[str, _Hyper], given: Mapping[str, Any], where: str,
                what: str, skip: tuple[str, ...] = ()) -> tuple[tuple[str, Any], ...]:
  """The arguments in `table`'s order (but those in `skip`, checked by the
  caller), checked, with defaults filled in."""
  unknown = sorted(set(given) - set(table))
  if unknown:
    raise TypeError(f"{where}: unknown {what} {', '.join(map(repr, unknown))}; it takes "
                    f"{', '.join(table)}")
  table = {k: h for k, h in table.items() if k not in skip}
  missing = [k for k, h in table.items() if h.default is _REQUIRED and k not in given]
  if missing:
    raise TypeError(f"{where}: missing {what} {', '.join(map(repr, missing))}")
  return tuple((k, h.check(given[k], f"{where}: {k}") if k in given else h.default) for k, h in table.items())


def _check_learning_rate(value: Any, where: str) -> float | tuple[tuple[str, Any], ...]:
  """A positive float, or a schedule ``{"schedule": NAME, **arguments}``
  (frozen as a tuple of pairs, ``("schedule", NAME)`` first)."""
  if isinstance(value, Mapping):
    name = value.get("schedule")
    if name not in SCHEDULES:
      raise ValueError(f"{where}: learning_rate schedule {name!r} is not known; give "
                       f"{{\"schedule\": NAME, ...}} with NAME one of {', '.join(SCHEDULES)}")
    args = _check_args(SCHEDULES[name], {k: v for k, v in value.items() if k != "schedule"},
                       f"{where}: learning_rate schedule {name!r}", "argument")
    if name == "warmup_cosine_decay" and dict(args)["decay_steps"] <= dict(args)["warmup_steps"]:
      raise ValueError(f"{where}: learning_rate schedule 'warmup_cosine_decay': decay_steps (the "
                       "total, warmup included) must exceed warmup_steps, got "
                       f"{dict(args)['decay_steps']} and {dict(args)['warmup_steps']}")
    return (("schedule", name), *args)
  if callable(value):
    raise TypeError(f"{where}: learning_rate is a function, which a run header cannot name; give a "
                    f"schedule as {{\"schedule\": NAME, ...}} with NAME one of {', '.join(SCHEDULES)}")
  return _Hyper("float", **_POSITIVE).check(value, f"{where}: learning_rate")


def _thaw(value: Any) -> Any:
  return dict(value) if isinstance(value, tuple) else value


@dataclasses.dataclass(frozen=True, init=False, repr=False)
class OptimizerSpec:
  """A named optax optimizer with its hyperparameters: a run's header records
  it (`to_dict`) and a resume or an audit rebuilds it (`from_dict`, `build`).

  ``OptimizerSpec(name, **hyperparameters)`` with `name` one of `OPTIMIZERS`
  (sgd, momentum, adam, adamw, rmsprop, lion) and its hyperparameters; those
  not given take the defaults listed there and are recorded too. The learning
  rate is a positive float or a schedule named as a JSON object, one of
  `SCHEDULES`::

    ginn.OptimizerSpec("adamw", learning_rate={"schedule": "warmup_cosine_decay",
                       "init_value": 0.0, "peak_value": 3e-3, "warmup_steps": 50,
                       "decay_steps": 1000}, weight_decay=0.01)

  A spec is frozen and hashable (equal specs share one jitted update) and
  checked when made: an unknown name or hyperparameter, a wrong type or a
  value out of range raises, naming it. The optimizer it builds runs under
  standard dtype promotion (optax's own code mixes Python floats with int32
  counts), whatever the process's setting.

  Attributes:
    name: the optimizer's name.
    hyperparameters: every hyperparameter, defaults filled in (a schedule as
      a dict with its ``"schedule"`` name).
  """

  name: str
  _items: tuple[tuple[str, Any], ...]

  def __init__(self, name: str, **hyperparameters: Any):
    if not isinstance(name, str) or name not in OPTIMIZERS:
      raise ValueError(f"unknown optimizer {name!r}; OptimizerSpec names one of {', '.join(OPTIMIZERS)} "
                       "(any other optax transformation can be passed to TrustedRuntime(optimizer=...) "
                       "for a run that is not persisted)")
    where = f"OptimizerSpec({name!r})"
    items = _check_args(OPTIMIZERS[name], hyperparameters, where, "hyperparameter", skip=("learning_rate",))
    rate = hyperparameters.get("learning_rate", _REQUIRED)
    if rate is _REQUIRED:
      raise TypeError(f"{where}: missing hyperparameter 'learning_rate' (a float, or a schedule "
                      f"{{\"schedule\": NAME, ...}} with NAME one of {', '.join(SCHEDULES)})")
    object.__setattr__(self, "name", name)
    object.__setattr__(self, "_items", (("learning_rate", _check_learning_rate(rate, where)), *items))

  @property
  def hyperparameters(self) -> dict[str, Any]:
    return {k: _thaw(v) for k, v in self._items}

  def __repr__(self) -> str:
    args = "".join(f", {k}={v!r}" for k, v in self.hyperparameters.items())
    return f"OptimizerSpec({self.name!r}{args})"

  def to_dict(self) -> dict[str, Any]:
    """JSON form: ``{"name": NAME, **hyperparameters}`` (a run header's
    ``config.optimizer``; an `OptimizerConfig` there has no ``"name"``)."""
    return {"name": self.name, **self.hyperparameters}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "OptimizerSpec":
    """The spec of `to_dict`'s form; checked as when made."""
    if not isinstance(d, Mapping) or "name" not in d:
      raise TypeError(f"an optimizer spec is a JSON object with a \"name\", got {d!r}")
    return cls(**d)

  def learning_rate(self) -> float | optax.Schedule:
    """The learning rate optax is given: the float, or the schedule function."""
    rate = self._items[0][1]
    if not isinstance(rate, tuple):
      return rate
    args = dict(rate)
    return _SCHEDULE_FNS[args.pop("schedule")](**args)

  def peak_learning_rate(self) -> float:
    """The largest learning rate of any step (math.inf for a schedule that
    grows without bound: exponential growth without an ``end_value``)."""
    rate = _thaw(self._items[0][1])
    if not isinstance(rate, dict):
      return rate
    kind = rate["schedule"]
    if kind == "constant":
      return rate["value"]
    if kind == "cosine_decay":  # From init_value to alpha * init_value.
      return rate["init_value"]
    if kind == "warmup_cosine_decay":
      return max(rate["init_value"], rate["peak_value"], rate["end_value"])
    if kind == "linear":
      return max(rate["init_value"], rate["end_value"])
    end = rate["end_value"]  # exponential_decay: end_value clips it.
    if rate["decay_rate"] <= 1.0:
      return rate["init_value"] if end is None else max(rate["init_value"], end)
    return math.inf if end is None else max(rate["init_value"], end)

  def build(self) -> optax.GradientTransformation:
    """The optax transformation (``sgd``/``momentum``: `add_decayed_weights`
    when weight_decay > 0, then `optax.sgd`, as `OptimizerConfig` does)."""
    h, lr = self.hyperparameters, self.learning_rate()
    if self.name in ("sgd", "momentum"):
      parts = [optax.add_decayed_weights(h["weight_decay"])] if h["weight_decay"] else []
      parts.append(optax.sgd(lr, momentum=h.get("momentum")))
      tx = optax.chain(*parts)
    elif self.name == "adam":
      tx = optax.adam(lr, b1=h["b1"], b2=h["b2"], eps=h["eps"])
    elif self.name == "adamw":
      tx = optax.adamw(lr, b1=h["b1"], b2=h["b2"], eps=h["eps"], weight_decay=h["weight_decay"])
    elif self.name == "rmsprop":
      tx = optax.rmsprop(lr, decay=h["decay"], eps=h["eps"], centered=h["centered"])
    elif self.name == "lion":
      tx = optax.lion(lr, b1=h["b1"], b2=h["b2"], weight_decay=h["weight_decay"])
    else:  # pragma: no cover  (the constructor admits only OPTIMIZERS)
      raise AssertionError(self.name)
    return _standard_promotion(tx)


def _standard_promotion(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """`tx` with its init and update traced under standard dtype promotion."""

  def init_fn(params):
    with jax.numpy_dtype_promotion("standard"):
      return tx.init(params)

  def update_fn(updates, state, params=None):
    with jax.numpy_dtype_promotion("standard"):
      return tx.update(updates, state, params)

  return optax.GradientTransformation(init_fn, update_fn)


Optimizer = OptimizerConfig | OptimizerSpec
"""What a run header can record: `ProtocolConfig.optimizer`."""


def optimizer_to_dict(optimizer: Optimizer) -> dict[str, Any]:
  """The header's ``config.optimizer``: `OptimizerConfig`'s fields as before
  specs existed (so old headers are unchanged), or `OptimizerSpec.to_dict`."""
  if isinstance(optimizer, OptimizerSpec):
    return optimizer.to_dict()
  return dataclasses.asdict(optimizer)


def optimizer_from_dict(d: Any) -> Optimizer:
  """The optimizer a header's ``config.optimizer`` records: an `OptimizerSpec`
  (an object with a ``"name"``) or an `OptimizerConfig` (its three fields).

  Raises:
    ValueError, TypeError: the header names no optimizer this version knows,
      or its hyperparameters are not valid.
  """
  if d is None:
    raise ValueError("the header records no optimizer: the run used an optax transformation given to "
                     "TrustedRuntime(optimizer=...), which cannot be rebuilt (persist runs with an "
                     "OptimizerSpec)")
  if not isinstance(d, Mapping):
    raise TypeError(f"the header's optimizer is not a JSON object: {d!r}")
  if "name" in d:
    return OptimizerSpec.from_dict(d)
  fields = {f.name for f in dataclasses.fields(OptimizerConfig)}
  if set(d) != fields:
    raise TypeError(f"the header's optimizer {d!r} is neither an OptimizerSpec (it has no \"name\") "
                    f"nor an OptimizerConfig (fields {', '.join(sorted(fields))})")
  return OptimizerConfig(**d)


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
def _cached_spec_transform(clip: ClipMode, clip_value: float | None, optimizer: OptimizerSpec,
                           num_shards: int = 1) -> optax.GradientTransformation:
  return _chain(clip, clip_value, optimizer.build(), num_shards)


@functools.lru_cache(maxsize=64)
def _cached_sgd_transform(clip: ClipMode, clip_value: float | None, optimizer: OptimizerConfig,
                          num_shards: int = 1) -> optax.GradientTransformation:
  return _chain(clip, clip_value, sgd_optimizer(optimizer), num_shards)


def make_update_transform(
    clip: ClipMode,
    clip_value: float | None,
    optimizer: OptimizerConfig | OptimizerSpec | optax.GradientTransformation,
    num_shards: int = 1,
) -> optax.GradientTransformation:
  """The trusted update ``named_chain(("clip", ...), ("optimizer", ...))``; with
  S > 1 shards ``named_chain(("clip_shards", ...), ("mean_shards", ...),
  ("optimizer", ...))``, taking gradients with a leading shard axis.

  Args:
    clip: "elementwise", "global_norm" or "none".
    clip_value: the bound C.
    optimizer: an `OptimizerConfig` (SGD, the analysed case), an
      `OptimizerSpec` (a named optax optimizer) or any optax transformation
      (see `ginn_jax.analysis` for what the clip then bounds).
    num_shards: S; with S > 1 each shard is clipped, then the shards averaged.
  """
  if isinstance(optimizer, OptimizerConfig):  # Equal configs share one object: no recompiles.
    return _cached_sgd_transform(clip, clip_value, optimizer, int(num_shards))
  if isinstance(optimizer, OptimizerSpec):  # So do equal specs.
    return _cached_spec_transform(clip, clip_value, optimizer, int(num_shards))
  return _cached_transform(clip, clip_value, optimizer, int(num_shards))


@functools.lru_cache(maxsize=64)
def _cached_transform(clip: ClipMode, clip_value: float | None,
                      optimizer: optax.GradientTransformation,
                      num_shards: int) -> optax.GradientTransformation:
  """The chain of a given optax transformation (hashed by its functions), built
  once, so runtimes sharing one optimizer object share one jitted update."""
  return _chain(clip, clip_value, optimizer, num_shards)
