"""Your own model: any pure loss, a flax linen module or a flax NNX module.

The protocol needs two pure functions of a model and nothing else:

* ``init(key) -> params``: the trusted side initialises the parameters;
* ``loss(params, batch, *, key) -> scalar``: the worker and the trusted
  verifier both differentiate it (the key drives dropout and any other layer
  randomness of the step).

`PureModel` takes those two functions as they are. `from_linen` and `from_nnx`
build them from a flax module and a loss written in the framework's own style,
``loss(model, batch)``, where `model` is callable like the module is:

* linen: ``model(*args, **kwargs)`` is ``module.apply({"params": params},
  *args, rngs=..., **kwargs)`` with one key per RNG stream the module asks for,
  each derived from the step's key;
* NNX: `model` *is* the module, rebuilt with `nnx.merge` from the parameters
  and from RNG state re-derived from the step's key (every `nnx.RngStream`
  gets ``fold_in(key, crc32(path))`` and a zero count). So dropout is a pure
  function of ``(params, batch, key)`` and the same on both sides.

A loss that also takes a keyword argument ``key`` is passed the step's key.

State other than parameters is the one thing a verified step cannot have: the
worker would report a gradient that depends on something the trusted side
does not hold (batch statistics it updated, a counter it advanced). Linen
modules with mutable collections besides ``params`` and NNX modules with
variables other than `nnx.Param` and RNG state (`nnx.BatchStat`, custom
`nnx.Variable` types) are refused with `NonPureModelError`, which names them.

Example::

  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.l1, self.l2 = nnx.Linear(784, 64, rngs=rngs), nnx.Linear(64, 10, rngs=rngs)
    def __call__(self, x):
      return self.l2(jax.nn.relu(self.l1(x.reshape(x.shape[0], -1))))

  def loss(model, batch):
    logits = model(batch["image"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

  model = ginn.from_nnx(MLP, loss, name="my_mlp")
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import zlib
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from ginn_jax._src.errors import GinnError
from ginn_jax._src.types import Params, PyTree


class NonPureModelError(GinnError, ValueError):
  """A model carries state other than its parameters, so its step is not a
  pure function of (params, batch, key)."""


def _takes_key(fn: Callable) -> bool:
  """Whether `fn` accepts a keyword argument ``key`` (or any keyword)."""
  try:
    params = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):
    return False
  return any(p.name == "key" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
             or p.kind == p.VAR_KEYWORD for p in params)


def _call_loss(loss: Callable, takes_key: bool, model, batch, key):
  return loss(model, batch, key=key) if takes_key else loss(model, batch)


def _stream_key(key: jax.Array, name: str) -> jax.Array:
  """The key of RNG stream (or state path) `name` in a step whose key is `key`."""
  return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


@dataclasses.dataclass(frozen=True, eq=False)
class PureModel:
  """A model given by its two pure functions.

  Attributes:
    name: a label, recorded in the transcript's header.
    init_fn: ``init_fn(key) -> params`` (a pytree of arrays).
    loss_fn: ``loss_fn(params, batch, *, key) -> scalar``.
    predict_fn: optional ``predict_fn(params, inputs) -> outputs`` for
      evaluation (e.g. logits, for `ginn_jax.accuracy`).

  Equality is identity: a model is a static argument of jitted functions, and
  two models built from the same functions compile once each.
  """

  name: str
  init_fn: Callable[[jax.Array], Params]
  loss_fn: Callable[..., jax.Array]
  predict_fn: Callable[[Params, Any], Any] | None = None

  @property
  def layered(self) -> bool:
    """False: witness checks need a `ginn_jax.LayeredModule`; re-computation
    checks (``ProtocolConfig.p``) work for every model."""
    return False

  @property
  def input_shape(self) -> None:
    return None

  def init(self, key: jax.Array) -> Params:
    """Initial parameters from `key` (pure)."""
    return self.init_fn(key)

  def loss(self, params: Params, batch: PyTree, *, key: jax.Array) -> jax.Array:
    """The scalar loss of `batch`; `key` is the step's layer key."""
    return self.loss_fn(params, batch, key=key)

  def logits(self, params: Params, inputs: Any) -> Any:
    """``predict_fn(params, inputs)``, for evaluation metrics."""
    if self.predict_fn is None:
      raise ValueError(f"model {self.name!r} has no predict_fn; pass one to evaluate it")
    return self.predict_fn(params, inputs)


def from_linen(module, loss: Callable, *, init_args: Sequence[Any], init_kwargs: dict | None = None,
               name: str | None = None, rng_streams: Sequence[str] = ("dropout",)) -> PureModel:
  """A `PureModel` from a flax linen module and a loss over it.

  Args:
    module: a ``flax.linen.Module``.
    loss: ``loss(model, batch) -> scalar`` (or with a keyword ``key``), where
      ``model(*args, **kwargs)`` applies `module` with the step's parameters
      and one key per stream of `rng_streams`.
    init_args, init_kwargs: example inputs for ``module.init`` (shapes and
      dtypes of one batch, e.g. ``(jnp.zeros((1, 28, 28, 1)),)``).
    name: label for the transcript (default: the module's class name).
    rng_streams: the RNG streams the module uses in training (``"dropout"``).

  Returns:
    A `PureModel` whose ``predict_fn(params, inputs)`` is
    ``module.apply({"params": params}, inputs)``.

  Raises:
    NonPureModelError: ``module.init`` creates collections besides ``params``
      (e.g. ``batch_stats``).
  """
  init_kwargs = dict(init_kwargs or {})
  def abstract_init():
    k = jax.random.key(0)
    return module.init({"params": k, **{s: k for s in rng_streams}}, *init_args, **init_kwargs)

  variables = jax.eval_shape(abstract_init)
  extra = sorted(set(variables) - {"params"})
  if extra:
    raise NonPureModelError(
        f"linen module {type(module).__name__} has mutable collections {extra} besides 'params'. "
        "A verified step must be a pure function of (params, batch, key): the worker's report "
        "would depend on state the trusted side does not hold. Use layer or group normalisation "
        "instead of batch norm, or keep such state out of the module.")
  streams = tuple(rng_streams)
  takes_key = _takes_key(loss)

  def init_fn(key):
    keys = {s: _stream_key(key, s) for s in streams}
    return module.init({"params": key, **keys}, *init_args, **init_kwargs)["params"]

  def loss_fn(params, batch, *, key):
    rngs = {s: _stream_key(key, s) for s in streams}
    model = functools.partial(module.apply, {"params": params}, rngs=rngs)
    return _call_loss(loss, takes_key, model, batch, key)

  def predict_fn(params, inputs):
    return module.apply({"params": params}, inputs)

  return PureModel(name=name or type(module).__name__, init_fn=init_fn, loss_fn=loss_fn,
                   predict_fn=predict_fn)


@dataclasses.dataclass(frozen=True, eq=False)
class NNXModel(PureModel):
  """A `PureModel` over a flax NNX module (see `from_nnx`).

  Attributes:
    make: ``make(rngs=nnx.Rngs(...)) -> nnx.Module``.
    graphdef: the module's static structure (`nnx.split`).
  """

  make: Callable | None = None
  graphdef: Any = None
  param_template: Any = None  # The abstract `nnx.Param` state.
  rng_template: Any = None  # The abstract RNG state.

  def _rng_values(self, fixed_key: bool):
    return _rng_values_fn(self, fixed_key)

  def merge(self, params: Params, *, key: jax.Array | None = None):
    """The NNX module with `params` (a nested dict, as the protocol holds
    them). Its RNG streams are derived from `key` (default: a fixed key);
    call ``.eval()`` on it to turn dropout off."""
    from flax import nnx  # pylint: disable=g-import-not-at-top
    from flax.traverse_util import flatten_dict  # pylint: disable=g-import-not-at-top
    flat = flatten_dict(params)
    pstate = nnx.from_flat_state([(path, var.replace(flat[path]))
                                  for path, var in nnx.to_flat_state(self.param_template)])
    flat_rng = nnx.to_flat_state(self.rng_template)
    values = self._rng_values(key is None)(*(() if key is None else (key,)))
    rng = [(path, var.replace(value)) for (path, var), value in zip(flat_rng, values)]
    return nnx.merge(self.graphdef, pstate, nnx.from_flat_state(rng))


@functools.lru_cache(maxsize=None)
def _rng_values_fn(model: "NNXModel", fixed_key: bool):
  """A jitted ``(key) -> values`` (or ``() -> values`` with a fixed key) of the
  module's RNG variables for the step of `key`: each stream's key is
  ``fold_in(key, crc32(path))``, each count 0."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  flat = nnx.to_flat_state(model.rng_template)

  def values(key):
    out = []
    for path, var in flat:
      sds = var.get_value()
      if isinstance(var, nnx.RngKey):
        k = _stream_key(key, "/".join(map(str, path)))
        out.append(k if sds.shape == () else jax.random.split(k, sds.shape))
      else:  # RngCount: every stream starts the step at zero.
        out.append(jnp.zeros(sds.shape, sds.dtype))
    return out

  return jax.jit((lambda: values(jax.random.key(0))) if fixed_key else values)


def from_nnx(make: Callable, loss: Callable, *, name: str | None = None,
             predict: Callable | None = None) -> NNXModel:
  """A model from a flax NNX module and an NNX-style loss.

  Args:
    make: ``make(rngs=nnx.Rngs(...)) -> nnx.Module``, e.g. the module's class
      (``MyModel`` with ``__init__(self, *, rngs)`` or ``__init__(self, rngs)``)
      or ``lambda rngs: MyModel(width, rngs=rngs)``. It is called with the
      keyword ``rngs``; the trusted side calls it under jit with
      ``nnx.Rngs(init_key)`` to initialise.
    loss: ``loss(model, batch) -> scalar`` (or with a keyword ``key``), where
      `model` is the module rebuilt from the step's parameters, with its RNG
      streams derived from the step's key.
    name: label for the transcript (default: the module's class name).
    predict: optional ``predict(model, inputs) -> outputs`` for evaluation
      (the model is in eval mode); default: ``model(inputs)``.

  Returns:
    An `NNXModel`: ``init`` returns the `nnx.Param` state as a nested dict
    (``nnx.to_pure_dict``); ``merge(params)`` rebuilds the module.

  Raises:
    NonPureModelError: the module holds variables other than `nnx.Param` and
      RNG state (for example `nnx.BatchStat`): they would change during a
      step, so the step would not be a pure function of (params, batch, key).
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  abstract = nnx.eval_shape(lambda: make(rngs=nnx.Rngs(0)))
  graphdef, params, rng, rest = nnx.split(abstract, nnx.Param, nnx.RngState, ...)
  others = nnx.to_flat_state(rest)
  if others:
    listed = ", ".join(f"{'.'.join(map(str, path))} ({type(v).__name__})" for path, v in others[:6])
    raise NonPureModelError(
        f"NNX module {type(abstract).__name__} holds state other than parameters and RNG "
        f"streams: {listed}{' ...' if len(others) > 6 else ''}. A verified step must be a pure "
        "function of (params, batch, key): a worker that updated this state would report a "
        "gradient the trusted side cannot re-compute. Replace batch norm by nnx.LayerNorm or "
        "nnx.GroupNorm, or keep the state out of the module (pass it in the batch).")
  takes_key = _takes_key(loss)

  def init_fn(key):
    return nnx.to_pure_dict(nnx.state(make(rngs=nnx.Rngs(key)), nnx.Param))

  model: NNXModel

  def loss_fn(p, batch, *, key):
    return _call_loss(loss, takes_key, model.merge(p, key=key), batch, key)

  def predict_fn(p, inputs):
    module = model.merge(p)
    module.eval()
    return predict(module, inputs) if predict is not None else module(inputs)

  model = NNXModel(name=name or type(abstract).__name__, init_fn=init_fn, loss_fn=loss_fn,
                   predict_fn=predict_fn, make=make, graphdef=graphdef, param_template=params,
                   rng_template=rng)
  return model
