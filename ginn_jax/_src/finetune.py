"""Fine-tuning: a frozen base and trained parameters (docs/design.md section 13).

Two ways to say what is trained, for any model with ``init(key)`` and a pure
``loss(params, batch, *, key)`` (built-in, `from_nnx`, `from_linen`,
`PureModel`):

* `lora`: low-rank adapters on chosen kernels. Each adapted kernel ``W0``
  (``d_in x d_out``) is used as ``W0 + (alpha / rank) * a @ b`` with ``a``
  (``d_in x rank``) and ``b`` (``rank x d_out``); ``b`` starts at zero, so
  step 0 is the base model (LoRA's convention).
* `freeze`: train the leaves that match a pattern, freeze the rest.

Both return a `FineTuneModel`: its ``init(key)`` gives the *trainable* tree
(what reports, clipping, the optimizer state, checkpoints and the transcript
cover), its ``frozen_params(key)`` the *frozen* tree (held by the trusted
side, committed by digest in the run header, sent to the worker once). Its
loss takes both: ``loss(params, batch, *, key, frozen)``.

Paths name leaves as ``"blocks/0/attn/qkv/kernel"`` (the tree's keys joined by
``/``); patterns are shell-style (`fnmatch`), e.g. ``"*attn*/kernel"``.

The adapted kernel is merged before use (``W0 + s * a @ b``), which works for
every model without touching its code. The worker's backward pass then forms
the full ``d_in x d_out`` gradient of each adapted kernel (as full
fine-tuning does) before projecting it on the adapters; what the trusted side
receives, hashes, clips and updates is the adapters only.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ginn_jax._src.types import Params, PyTree

# A leaf of the trainable tree of `lora`: the two factors of one adapted kernel.
LORA_A = "a"
LORA_B = "b"


def path_str(path) -> str:
  """``"blocks/0/attn/qkv/kernel"`` for a key path of `jax.tree_util`."""
  parts = []
  for k in path:
    for attr in ("key", "idx", "name"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def leaf_paths(tree: PyTree) -> list[str]:
  """The `path_str` of every leaf of `tree`, in tree order."""
  return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _as_patterns(patterns, what: str) -> tuple[str, ...]:
  if isinstance(patterns, str):
    patterns = (patterns,)
  try:
    out = tuple(patterns)
  except TypeError:
    raise TypeError(f"{what} must be a pattern or a sequence of patterns, got {patterns!r}") from None
  if not out or not all(isinstance(p, str) and p for p in out):
    raise ValueError(f"{what} must be non-empty patterns (strings), got {patterns!r}")
  return out


def _matching(paths: Sequence[str], patterns: tuple[str, ...], what: str) -> list[str]:
  """The paths matched by any pattern; every pattern must match something."""
  for p in patterns:
    if not any(fnmatch.fnmatchcase(path, p) for path in paths):
      shown = ", ".join(paths[:8]) + (" ..." if len(paths) > 8 else "")
      raise ValueError(f"{what} pattern {p!r} matches no parameter; the parameters are: {shown}")
  return [path for path in paths if any(fnmatch.fnmatchcase(path, p) for p in patterns)]


@dataclasses.dataclass(frozen=True, eq=False)
class FineTuneModel:
  """A model with a frozen base and trainable parameters (see `lora`, `freeze`).

  Attributes:
    name: label for the run header (the base's name and the method).
    base: the wrapped model.
    method: "lora" or "freeze".
    targets: the base leaves that are trained (`freeze`) or adapted (`lora`).
    rank, alpha: LoRA's rank and scale numerator (``scale = alpha / rank``).
    base_params: the pretrained base parameters (None: the base's own init
      from the run's init key).

  Equality is identity (the model is a static argument of jitted functions).
  """

  name: str
  base: Any
  method: str
  targets: tuple[str, ...]
  rank: int | None = None
  alpha: float | None = None
  base_params: Params | None = None
  _treedef: Any = None
  _paths: tuple[str, ...] = ()
  _shapes: tuple[Any, ...] = ()

  # -- the protocol's view -----------------------------------------------------

  @property
  def input_shape(self):
    return getattr(self.base, "input_shape", None)

  @property
  def layered(self) -> bool:
    return False

  @property
  def scale(self) -> float:
    """``alpha / rank`` (LoRA); 1 for `freeze`."""
    return 1.0 if self.method != "lora" else float(self.alpha) / float(self.rank)

  def _base_leaves(self, key: jax.Array | None) -> list:
    if self.base_params is not None:
      return jax.tree_util.tree_leaves(self.base_params)
    if key is None:
      raise TypeError(
          f"{self.name}: this model has no pretrained base parameters (params=None), so its frozen "
          "base is the base model's init from the run's init key; pass that key, or pass the "
          "runtime's frozen tree (rt.frozen) to the worker")
    return jax.tree_util.tree_leaves(_jitted_init(self.base)(key))

  def frozen_params(self, key: jax.Array | None = None) -> Params:
    """The frozen tree: ``{path: array}`` of every frozen base leaf (for
    `lora`, every base leaf). `key` is ignored when the model holds pretrained
    `base_params`; otherwise it is the run's init key."""
    leaves = self._base_leaves(key)
    trained = set(self.targets) if self.method == "freeze" else set()
    return {p: x for p, x in zip(self._paths, leaves) if p not in trained}

  def init(self, key: jax.Array) -> Params:
    """The initial trainable tree. `freeze`: ``{path: array}`` of the trained
    leaves at their base values. `lora`: ``{path: {"a": a, "b": b}}`` per
    adapted kernel, ``a`` uniform in ±1/sqrt(d_in) (from `key`), ``b`` zero."""
    if self.method == "freeze":
      leaves = dict(zip(self._paths, self._base_leaves(key)))
      return {p: leaves[p] for p in self.targets}
    out = {}
    shapes = dict(zip(self._paths, self._shapes))
    for i, p in enumerate(self.targets):
      shape = shapes[p]
      d_in, d_out = shape.shape[0], math.prod(shape.shape[1:])
      k = jax.random.fold_in(jax.random.fold_in(key, 0x10A), i)
      bound = 1.0 / math.sqrt(d_in)
      a = jax.random.uniform(k, (d_in, self.rank), shape.dtype, -bound, bound)
      out[p] = {LORA_A: a, LORA_B: jnp.zeros((self.rank, d_out), shape.dtype)}
    return out

  def merged(self, params: Params, frozen: Params) -> Params:
    """The base model's parameter tree with the trained `params` in place
    (`lora`: each adapted kernel ``W0 + scale * a @ b``), for evaluating the
    fine-tuned model with the base: ``base.logits(ft.merged(params, frozen), x)``."""
    if frozen is None:
      raise TypeError(f"{self.name} has frozen parameters: pass frozen= (the run's frozen tree)")
    return _jitted_merge(self)(params, frozen)

  def _merge(self, params: Params, frozen: Params) -> Params:
    leaves = []
    for p in self._paths:
      if self.method == "freeze":
        leaves.append(params[p] if p in params else frozen[p])
      elif p in params:
        w0, ab = frozen[p], params[p]
        delta = (ab[LORA_A] @ ab[LORA_B]) * self.scale
        leaves.append(w0 + delta.reshape(w0.shape).astype(w0.dtype))
      else:
        leaves.append(frozen[p])
    return jax.tree_util.tree_unflatten(self._treedef, leaves)

  def loss(self, params: Params, batch: PyTree, *, key: jax.Array, frozen: Params = None) -> jax.Array:
    """The base's loss with `params` merged into the frozen base."""
    return self.base.loss(self.merged(params, frozen), batch, key=key)

  def logits(self, params: Params, inputs: Any, *, frozen: Params = None) -> Any:
    """The base's evaluation output of the fine-tuned model (needs `frozen`)."""
    return self.base.logits(self.merged(params, frozen), inputs)

  def describe(self) -> dict[str, Any]:
    """The public description recorded in a run's header (``finetune``):
    enough for `from_description` to rebuild the model around its base."""
    d = {"method": self.method, "base": getattr(self.base, "name", None), "targets": list(self.targets),
         "pretrained": self.base_params is not None}
    if self.method == "lora":
      d.update(rank=self.rank, alpha=self.alpha)
    return d

  def num_trainable(self) -> int:
    """The number of trained scalars."""
    shapes = dict(zip(self._paths, self._shapes))
    if self.method == "freeze":
      return sum(math.prod(shapes[p].shape) for p in self.targets)
    return sum(self.rank * (shapes[p].shape[0] + math.prod(shapes[p].shape[1:])) for p in self.targets)

  def num_frozen(self) -> int:
    """The number of frozen scalars."""
    trained = set(self.targets) if self.method == "freeze" else set()
    return sum(math.prod(s.shape) for p, s in zip(self._paths, self._shapes) if p not in trained)


@functools.lru_cache(maxsize=16)
def _jitted_merge(model: FineTuneModel):
  return jax.jit(model._merge)  # pylint: disable=protected-access


@functools.lru_cache(maxsize=16)
def _jitted_init(model):
  return jax.jit(model.init)


def _abstract_base(model, params):
  if params is not None:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    shapes = [jax.ShapeDtypeStruct(np.shape(x), x.dtype) for _, x in leaves]
    want = jax.eval_shape(lambda: model.init(jax.random.key(0)))
    if jax.tree_util.tree_structure(want) != treedef or any(
        (tuple(w.shape), w.dtype) != (tuple(s.shape), s.dtype)
        for w, s in zip(jax.tree_util.tree_leaves(want), shapes)):
      raise ValueError(
          "params do not match the base model's parameters (structure, shapes or dtypes); pass "
          "the base model's own parameter tree (e.g. a pretraining run's result.params)")
    return [path_str(p) for p, _ in leaves], shapes, treedef
  shape = jax.eval_shape(lambda: model.init(jax.random.key(0)))
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shape)
  return [path_str(p) for p, _ in leaves], [s for _, s in leaves], treedef


def lora(model, *, rank: int, alpha: float | None = None, targets: str | Sequence[str] = "*kernel",
         params: Params | None = None, name: str | None = None) -> FineTuneModel:
  """Low-rank adapters (LoRA) on a model's chosen kernels, the base frozen.

  Args:
    model: any model with ``init(key)`` and a pure ``loss(params, batch, *,
      key)``: NNX (`from_nnx`), linen (`from_linen`), `PureModel` or built-in.
    rank: the adapters' rank r (a positive int).
    alpha: the scale numerator; the update is ``(alpha / rank) * a @ b``
      (default: `rank`, a scale of 1).
    targets: pattern(s) of the kernels to adapt, matched against leaf paths
      such as ``"blocks/0/attn/qkv/kernel"`` (default: every ``*kernel`` leaf
      with at least two axes). A kernel of more than two axes is adapted as
      the matrix (first axis) x (the rest).
    params: the pretrained base parameters (default: the base's init from the
      run's init key, for tests and from-scratch runs).
    name: label for the run header (default ``"<base>+lora<rank>"``).

  Returns:
    A `FineTuneModel` whose trainable parameters are the adapters and whose
    frozen parameters are the base.

  Raises:
    ValueError: a bad rank or alpha, a pattern that matches nothing, a target
      that is not a matrix, or `params` that are not the base's.

  Example::

    ft = ginn.lora(base, rank=8, alpha=16, targets=("*attn*/kernel", "*fc*/kernel"),
                   params=pretrained)
    frozen = ft.frozen_params()
    rt = ginn.TrustedRuntime(ft, data, config, frozen=frozen)
    worker = ginn.HonestWorker(ft, data, frozen=frozen)
  """
  if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
    raise ValueError(f"rank must be a positive int, got {rank!r}")
  alpha = float(rank) if alpha is None else alpha
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (alpha > 0 and math.isfinite(alpha)):
    raise ValueError(f"alpha must be a positive finite number, got {alpha!r}")
  paths, shapes, treedef = _abstract_base(model, params)
  patterns = _as_patterns(targets, "targets")
  chosen = _matching(paths, patterns, "targets")
  by_path = dict(zip(paths, shapes))
  if targets == "*kernel":  # The default: only matrices.
    chosen = [p for p in chosen if len(by_path[p].shape) >= 2]
  for p in chosen:
    s = by_path[p]
    if len(s.shape) < 2 or not jnp.issubdtype(s.dtype, jnp.floating):
      raise ValueError(f"LoRA target {p!r} has shape {tuple(s.shape)} and dtype {s.dtype}: only "
                       "floating-point kernels of two or more axes can be adapted")
  if not chosen:
    raise ValueError(f"targets {patterns} select no kernel of two or more axes")
  base_name = getattr(model, "name", type(model).__name__)
  return FineTuneModel(name=name or f"{base_name}+lora{int(rank)}", base=model, method="lora",
                       targets=tuple(chosen), rank=int(rank), alpha=float(alpha), base_params=params,
                       _treedef=treedef, _paths=tuple(paths), _shapes=tuple(shapes))


def freeze(model, *, trainable: str | Sequence[str], params: Params | None = None,
           name: str | None = None) -> FineTuneModel:
  """Trains the leaves that match `trainable` and freezes the rest.

  Args:
    model: any model with ``init(key)`` and a pure loss (as for `lora`).
    trainable: pattern(s) of the leaves to train, e.g. ``"head/*"``.
    params: the pretrained parameters (default: the base's init).
    name: label for the run header (default ``"<base>+freeze"``).

  Returns:
    A `FineTuneModel` whose trainable tree is ``{path: array}`` of the
    matched leaves and whose frozen tree is the rest.

  Raises:
    ValueError: a pattern matches nothing, or every leaf (nothing frozen).
  """
  paths, shapes, treedef = _abstract_base(model, params)
  chosen = _matching(paths, _as_patterns(trainable, "trainable"), "trainable")
  if len(chosen) == len(paths):
    raise ValueError(f"trainable patterns {trainable!r} match every parameter: nothing is frozen; "
                     "train the model itself instead")
  base_name = getattr(model, "name", type(model).__name__)
  return FineTuneModel(name=name or f"{base_name}+freeze", base=model, method="freeze",
                       targets=tuple(chosen), base_params=params, _treedef=treedef,
                       _paths=tuple(paths), _shapes=tuple(shapes))


def has_frozen(model) -> bool:
  """Whether `model` has frozen parameters (its loss takes ``frozen=``)."""
  return callable(getattr(model, "frozen_params", None))


def check_frozen(model, frozen: Params, key: jax.Array | None = None) -> None:
  """Raises ValueError unless `frozen` has the structure, shapes and dtypes of
  `model`'s frozen tree."""
  del key  # Shapes only.
  want = jax.eval_shape(lambda: model.frozen_params(jax.random.key(0)))
  got_def = jax.tree_util.tree_structure(frozen)
  want_def = jax.tree_util.tree_structure(want)
  if got_def != want_def:
    missing = sorted(set(leaf_paths(want)) - set(leaf_paths(frozen)))
    extra = sorted(set(leaf_paths(frozen)) - set(leaf_paths(want)))
    raise ValueError(f"frozen parameters do not match the model's frozen tree (missing: "
                     f"{missing[:5] or 'none'}; unexpected: {extra[:5] or 'none'})")
  for p, w, g in zip(leaf_paths(want), jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(frozen)):
    if (tuple(w.shape), np.dtype(w.dtype)) != (tuple(np.shape(g)), np.dtype(g.dtype)):
      raise ValueError(f"frozen parameter {p} has shape {tuple(np.shape(g))} and dtype {g.dtype}; "
                       f"the model's has {tuple(w.shape)} and {w.dtype}")


def from_description(base, description: dict[str, Any], *, name: str | None = None) -> FineTuneModel:
  """The `FineTuneModel` a run header's ``finetune`` describes, around `base`
  (without pretrained parameters: the frozen tree is passed to the runtime or
  the audit)."""
  method = description.get("method")
  targets = tuple(description.get("targets") or ())
  if method == "lora":
    return lora(base, rank=int(description["rank"]), alpha=float(description["alpha"]),
                targets=targets, name=name)
  if method == "freeze":
    return freeze(base, trainable=targets, name=name)
  raise ValueError(f"unknown fine-tuning method {method!r} in the header")


def save_frozen(path, frozen: Params) -> str:
  """Writes a frozen tree (``{path: array}``, as `FineTuneModel.frozen_params`
  gives) to an ``.npz`` file for `audit_run`/``ginn audit --frozen`` (no
  pickles; dtypes numpy cannot store, such as bfloat16, are kept as their raw
  bits with the dtype's name).

  Returns:
    The frozen digest of what was written (the run header's ``frozen_digest``).
  """
  import os  # pylint: disable=g-import-not-at-top
  from ginn_jax._src.trusted.runtime import frozen_digest  # pylint: disable=g-import-not-at-top
  if not isinstance(frozen, dict) or not all(isinstance(k, str) and k for k in frozen):
    raise TypeError("save_frozen takes a flat dict {path: array} (a FineTuneModel's frozen tree)")
  host = {k: np.asarray(v) for k, v in jax.device_get(frozen).items()}  # One read of each leaf.
  arrays, dtypes = {}, {}
  for k, a in host.items():
    if a.dtype.kind == "V" or a.dtype.name not in np.sctypeDict:  # e.g. ml_dtypes' bfloat16.
      dtypes[k] = a.dtype.name
      a = a.view(f"u{a.dtype.itemsize}")
    arrays[k] = a
  with open(os.fspath(path), "wb") as f:
    np.savez(f, **arrays, **{_DTYPES_KEY: np.array(json.dumps(dtypes))})
  return frozen_digest(host)


_DTYPES_KEY = "__ginn_dtypes__"


def load_frozen(path) -> Params:
  """Reads a frozen tree written by `save_frozen` (no pickles)."""
  import os  # pylint: disable=g-import-not-at-top
  with np.load(os.fspath(path), allow_pickle=False) as z:
    dtypes = json.loads(str(z[_DTYPES_KEY])) if _DTYPES_KEY in z.files else {}
    out = {}
    for k in z.files:
      if k == _DTYPES_KEY:
        continue
      a = np.asarray(z[k])
      out[k] = a.view(jnp.dtype(dtypes[k])) if k in dtypes else a
    return out
