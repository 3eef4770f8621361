"""Layered models: one definition, a fused loss and a witness (docs/design.md section 10).

A layered model is a sequence of linear layers (`Conv`, `Dense`) with local
element-wise ops between them (`ReLU`, `MaxPool`, `AvgPool`, `Flatten`,
`Dropout`), ending in a linear layer whose output is the logits. From that one
definition (`LayeredModule`, a flax module) come:

* the fused loss, exactly as for any other model (``Model.loss``);
* the layered forward/backward (`loss_grads_and_witness`): the same gradient,
  plus the *witness* of the step: each linear layer l's pre-activation output
  Y_l and the gradient dX_l of the loss with respect to its input (l >= 1);
* the element-wise pieces the trusted witness check needs: ``f_l`` (the ops
  between layer l and l+1) and its VJP, both O(size) (`segment_forward`,
  `segment_vjp`).

The input gradients come from the same autodiff graph as the parameter
gradients: a zero "tap" is added to each linear layer's input and the
gradient with respect to the tap is dX_l. Adding zero is exact, so the
parameter gradients are those of the fused loss.

Dropout draws its mask from ``fold_in(key, i)`` with i the op's position in
the sequence, so the trusted side can rebuild it from the step's layer key.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

# -- the ops ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Conv:
  """2-D convolution, NHWC, stride 1, "SAME" or "VALID" padding, with bias."""

  features: int
  kernel: tuple[int, int] = (3, 3)
  padding: str = "SAME"

  def __post_init__(self):
    if self.padding not in ("SAME", "VALID"):
      raise ValueError(f"Conv padding must be 'SAME' or 'VALID', got {self.padding!r}")
    if any(k % 2 == 0 for k in self.kernel) and self.padding == "SAME":
      raise ValueError(f"Conv with SAME padding needs an odd kernel, got {self.kernel}")


@dataclasses.dataclass(frozen=True)
class Dense:
  """Fully connected layer on the last axis, with bias."""

  features: int


@dataclasses.dataclass(frozen=True)
class ReLU:
  pass


@dataclasses.dataclass(frozen=True)
class MaxPool:
  """Max-pool with window = stride = `window`, "SAME" padding (as `nn.max_pool`
  with padding="SAME"): odd sizes are padded with -inf at the end."""

  window: int = 2


@dataclasses.dataclass(frozen=True)
class AvgPool:
  """Average-pool with window = stride = `window`, "VALID" (sizes must divide)."""

  window: int = 2


@dataclasses.dataclass(frozen=True)
class Flatten:
  pass


@dataclasses.dataclass(frozen=True)
class Dropout:
  """Inverted dropout; the mask is ``bernoulli(fold_in(key, i), 1 - rate)``."""

  rate: float

  def __post_init__(self):
    if not 0.0 <= self.rate < 1.0:
      raise ValueError(f"Dropout rate must be in [0, 1), got {self.rate!r}")


Linear = Union[Conv, Dense]
Op = Union[Conv, Dense, ReLU, MaxPool, AvgPool, Flatten, Dropout]
LINEAR = (Conv, Dense)
ELEMENTWISE = (ReLU, MaxPool, AvgPool, Flatten, Dropout)


def linear_names(layers: Sequence[Op]) -> tuple[str, ...]:
  """Parameter names of the linear layers, flax-style: Conv_0, Conv_1, Dense_0, ..."""
  counts = {"Conv": 0, "Dense": 0}
  names = []
  for op in layers:
    if isinstance(op, LINEAR):
      kind = type(op).__name__
      names.append(f"{kind}_{counts[kind]}")
      counts[kind] += 1
  return tuple(names)


def check_layers(layers: Sequence[Op]) -> None:
  """Raises ValueError unless `layers` is a valid layered model."""
  if not layers:
    raise ValueError("a layered model needs at least one layer")
  for op in layers:
    if not isinstance(op, LINEAR + ELEMENTWISE):
      raise ValueError(f"{op!r} is not a layered-model op (Conv, Dense, ReLU, MaxPool, AvgPool, "
                       "Flatten, Dropout)")
  if not isinstance(layers[-1], LINEAR):
    raise ValueError("a layered model must end with a linear layer (its output is the logits)")


# -- element-wise ops, forward and VJP, O(size) ---------------------------------------------


def _same_pad(size: int, window: int) -> tuple[int, int]:
  out = -(-size // window)
  total = max((out - 1) * window + window - size, 0)
  return total // 2, total - total // 2


def _pool_windows(x: jax.Array, w: int, pad_value: float) -> tuple[jax.Array, tuple]:
  """[N, H, W, C] -> [N, Ho, Wo, C, w*w] windows (row-major in the window)."""
  n, h, wd, c = x.shape
  (hl, hh), (wl, wh) = _same_pad(h, w), _same_pad(wd, w)
  if hl or hh or wl or wh:
    x = jnp.pad(x, ((0, 0), (hl, hh), (wl, wh), (0, 0)), constant_values=pad_value)
  ho, wo = x.shape[1] // w, x.shape[2] // w
  x = x.reshape(n, ho, w, wo, w, c).transpose(0, 1, 3, 5, 2, 4).reshape(n, ho, wo, c, w * w)
  return x, (n, h, wd, c, hl, wl, ho, wo)


def _unwindow(g: jax.Array, w: int, meta: tuple) -> jax.Array:
  n, h, wd, c, hl, wl, ho, wo = meta
  g = g.reshape(n, ho, wo, c, w, w).transpose(0, 1, 4, 2, 5, 3).reshape(n, ho * w, wo * w, c)
  return g[:, hl:hl + h, wl:wl + wd, :]


def op_forward(op: Op, i: int, x: jax.Array, *, key: jax.Array | None, train: bool) -> jax.Array:
  """Element-wise op number `i` of the sequence, applied to `x`."""
  if isinstance(op, ReLU):
    return jax.nn.relu(x)
  if isinstance(op, MaxPool):
    if op.window == 1:
      return x
    return nn.max_pool(x, (op.window, op.window), strides=(op.window, op.window), padding="SAME")
  if isinstance(op, AvgPool):
    if x.shape[1] % op.window or x.shape[2] % op.window:
      raise ValueError(f"AvgPool({op.window}) needs sizes divisible by the window, got {x.shape}")
    n, h, w, c = x.shape
    k = op.window
    return x.reshape(n, h // k, k, w // k, k, c).mean(axis=(2, 4))
  if isinstance(op, Flatten):
    return x.reshape((x.shape[0], -1))
  if isinstance(op, Dropout):
    return _dropout(op, i, key, x, train)
  raise TypeError(f"not an element-wise op: {op!r}")


def _dropout(op: Dropout, i: int, key: jax.Array | None, x: jax.Array, train: bool) -> jax.Array:
  """Inverted dropout of `x` with op i's mask; linear in x, so it is its own VJP."""
  if not train or op.rate == 0.0:
    return x
  if key is None:
    raise ValueError("dropout in training mode needs the step's layer key")
  keep = jax.random.bernoulli(jax.random.fold_in(key, i), 1.0 - op.rate, x.shape)
  return jnp.where(keep, x / jnp.asarray(1.0 - op.rate, x.dtype), jnp.zeros_like(x))


def _fast_forward(op: Op, i: int, x: jax.Array, key, train) -> tuple[jax.Array, object]:
  """Forward of one element-wise op for the trusted check, with what its VJP needs."""
  if isinstance(op, MaxPool) and op.window > 1:
    win, meta = _pool_windows(x, op.window, -jnp.inf)
    return win.max(axis=-1), (win, meta)
  return op_forward(op, i, x, key=key, train=train), x


def _fast_vjp(op: Op, i: int, saved, g: jax.Array, key, train) -> jax.Array:
  """VJP of one element-wise op at the saved input, applied to `g`; O(size).

  Max-pool routes the gradient to the first maximum of each window in
  row-major order (XLA's select-and-scatter tie rule) with a one-hot mask
  instead of the generic select-and-scatter, which is slow on XLA CPU.
  """
  if isinstance(op, ReLU):
    return jnp.where(saved > 0, g, jnp.zeros_like(g))
  if isinstance(op, MaxPool):
    if op.window == 1:
      return g
    win, meta = saved
    first = jnp.argmax(win, axis=-1)
    onehot = jnp.arange(win.shape[-1]) == first[..., None]
    return _unwindow(jnp.where(onehot, g[..., None], jnp.zeros_like(win)), op.window, meta)
  if isinstance(op, AvgPool):
    k = op.window
    g = g / jnp.asarray(k * k, g.dtype)
    return jnp.repeat(jnp.repeat(g, k, axis=1), k, axis=2)
  if isinstance(op, Flatten):
    return g.reshape(saved.shape)
  if isinstance(op, Dropout):
    return _dropout(op, i, key, g, train)
  raise TypeError(f"not an element-wise op: {op!r}")


# -- the module ------------------------------------------------------------------------------


class LayeredModule(nn.Module):
  """A flax module defined by a sequence of layered-model ops.

  ``__call__(x, *, train=False, key=None, taps=None, return_outputs=False)``:
  `key` drives dropout; `taps` (one array per linear layer after the first,
  shaped like that layer's input) are added to those inputs, so the gradient
  with respect to them is dX_l; with `return_outputs` the module also returns
  the list of pre-activation outputs Y_l.
  """

  layers: tuple[Op, ...]

  @nn.compact
  def __call__(self, x, *, train: bool = False, key: jax.Array | None = None, taps=None,
               return_outputs: bool = False):
    names = iter(linear_names(self.layers))
    outputs = []
    for i, op in enumerate(self.layers):
      if isinstance(op, LINEAR):
        if taps is not None and outputs:
          x = x + taps[len(outputs) - 1]
        if isinstance(op, Conv):
          x = nn.Conv(op.features, op.kernel, padding=op.padding, name=next(names))(x)
        else:
          x = nn.Dense(op.features, name=next(names))(x)
        outputs.append(x)
      else:
        x = op_forward(op, i, x, key=key, train=train)
    return (x, outputs) if return_outputs else x


# -- segments: the element-wise ops between two linear layers ---------------------------------


@dataclasses.dataclass(frozen=True)
class Structure:
  """Where the linear layers and the element-wise segments are.

  Attributes:
    layers: the op sequence.
    linear: (op index, op) of each linear layer, in order.
    names: each linear layer's parameter name.
    prefix: the element-wise ops before the first linear layer (they map the
      batch's inputs to X_0, e.g. a Flatten).
    segments: for each linear layer but the last, the (op index, op) pairs of
      the element-wise ops after it (f_l maps Y_l to X_{l+1}).
  """

  layers: tuple[Op, ...]
  linear: tuple[tuple[int, Linear], ...]
  names: tuple[str, ...]
  prefix: tuple[tuple[int, Op], ...]
  segments: tuple[tuple[tuple[int, Op], ...], ...]

  @classmethod
  def of(cls, layers: Sequence[Op]) -> "Structure":
    layers = tuple(layers)
    check_layers(layers)
    linear, segments, prefix = [], [], []
    for i, op in enumerate(layers):
      if isinstance(op, LINEAR):
        linear.append((i, op))
        segments.append([])
      elif not linear:
        prefix.append((i, op))
      else:
        segments[-1].append((i, op))
    return cls(layers=layers, linear=tuple(linear), names=linear_names(layers),
               prefix=tuple(prefix), segments=tuple(tuple(s) for s in segments[:-1]))

  @property
  def num_linear(self) -> int:
    return len(self.linear)


def _pool2_parts(y: jax.Array):
  """The four 2x2-window members of y (padded with -inf to even sizes, as
  "SAME" pooling does), each [N, Ho, Wo, C], in row-major window order."""
  n, h, w, c = y.shape
  (hl, hh), (wl, wh) = _same_pad(h, 2), _same_pad(w, 2)
  if hl or hh or wl or wh:
    y = jnp.pad(y, ((0, 0), (hl, hh), (wl, wh), (0, 0)), constant_values=-jnp.inf)
  v = y.reshape(n, y.shape[1] // 2, 2, y.shape[2] // 2, 2, c)
  return (v[:, :, 0, :, 0], v[:, :, 0, :, 1], v[:, :, 1, :, 0], v[:, :, 1, :, 1]), (h, w, hl, wl)


def _pool2_forward(y: jax.Array, relu: bool):
  (a, b, c, d), _ = _pool2_parts(y)
  m = jnp.maximum(jnp.maximum(a, b), jnp.maximum(c, d))
  return jnp.maximum(m, jnp.zeros((), m.dtype)) if relu else m


def _pool2_vjp(y: jax.Array, g: jax.Array, relu: bool) -> jax.Array:
  """VJP of [ReLU then] 2x2 max-pool at y: g goes to the first maximum of each
  window in row-major order (XLA's select-and-scatter tie rule), and nowhere
  when ReLU zeroed the window. Strided slices and one interleave, no
  select-and-scatter (slow on XLA CPU) and no transposes."""
  (a, b, c, d), (h, w, hl, wl) = _pool2_parts(y)
  m = jnp.maximum(jnp.maximum(a, b), jnp.maximum(c, d))
  ta = a == m
  tb = (b == m) & ~ta
  tc = (c == m) & ~ta & ~tb
  td = ~(ta | tb | tc)
  z = jnp.zeros((), g.dtype)
  live = m > 0 if relu else jnp.ones((), bool)
  ga, gb, gc, gd = (jnp.where(t & live, g, z) for t in (ta, tb, tc, td))
  n, ho, wo, ch = g.shape
  out = jnp.stack([jnp.stack([ga, gb], axis=3), jnp.stack([gc, gd], axis=3)], axis=2)
  return out.reshape(n, 2 * ho, 2 * wo, ch)[:, hl:hl + h, wl:wl + w, :]


def _fused(segment):
  """The segment's ops, with each ReLU directly followed by MaxPool(2) (and
  each lone MaxPool(2)) as one ("pool2", relu) op."""
  ops, i = [], 0
  while i < len(segment):
    idx, op = segment[i]
    nxt = segment[i + 1][1] if i + 1 < len(segment) else None
    if isinstance(op, ReLU) and isinstance(nxt, MaxPool) and nxt.window == 2:
      ops.append((idx, ("pool2", True)))
      i += 2
      continue
    if isinstance(op, MaxPool) and op.window == 2:
      ops.append((idx, ("pool2", False)))
    else:
      ops.append((idx, op))
    i += 1
  return ops


def segment_forward(segment, y: jax.Array, *, key, train: bool = True):
  """X_{l+1} = f_l(Y_l), and what `segment_vjp` needs."""
  saved = []
  x = y
  for i, op in _fused(segment):
    if isinstance(op, tuple):
      saved.append(x)
      x = _pool2_forward(x, op[1])
    else:
      x, s = _fast_forward(op, i, x, key, train)
      saved.append(s)
  return x, saved


def segment_vjp(segment, saved, g: jax.Array, *, key, train: bool = True) -> jax.Array:
  """dY_l = VJP of f_l at Y_l applied to dX_{l+1}."""
  for (i, op), s in zip(reversed(_fused(segment)), reversed(saved)):
    g = _pool2_vjp(s, g, op[1]) if isinstance(op, tuple) else _fast_vjp(op, i, s, g, key, train)
  return g


# -- loss and the worker's witness -----------------------------------------------------------


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy with integer labels (the classifier loss)."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def tap_shapes(module: LayeredModule, params, images: jax.Array) -> list[jax.ShapeDtypeStruct]:
  """Shapes of the linear layers' inputs X_1..X_{L-1} for this batch (static)."""
  _, outputs = jax.eval_shape(
      lambda p, x: module.apply({"params": p}, x, train=False, return_outputs=True), params, images)
  structure = Structure.of(module.layers)
  shapes = []
  for seg, y in zip(structure.segments, outputs):
    x = jax.eval_shape(lambda y, seg=seg: segment_forward(seg, y, key=None, train=False)[0], y)
    shapes.append(x)
  return shapes


def loss_grads_and_witness(module: LayeredModule, params, images, labels, key):
  """``(loss, grads, outputs, input_grads)``: the fused loss's value and gradient,
  with the witness (Y_l for every linear layer, dX_l for l >= 1)."""
  taps = [jnp.zeros(s.shape, s.dtype) for s in tap_shapes(module, params, images)]

  def f(p, t):
    logits, outputs = module.apply({"params": p}, images, train=True, key=key, taps=t,
                                   return_outputs=True)
    return cross_entropy(logits, labels), outputs

  (loss, outputs), (grads, input_grads) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(
      params, taps)
  return loss, grads, list(outputs), list(input_grads)
