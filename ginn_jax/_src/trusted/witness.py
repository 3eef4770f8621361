"""The witness check (Freivalds): verify a step without re-computing its products.

docs/design.md section 10. For a step drawn for a witness check the worker
answers a `WitnessRequest` with a `Witness`: each linear layer's output Y_l
and the input gradient dX_l (l >= 1). This module

* validates it (`validate_witness`: structure, shapes, dtypes, finite);
* hashes it (`witness_digest`, BLAKE3) and derives the secret Gaussian vectors from the
  audit secret, the step and that digest (`freivalds_seed`), so they are
  fixed only after the witness is;
* checks it (`witness_errors`), with X_0 the trusted batch, X_{l+1} = f_l(Y_l)
  and dY_l the VJP of f_l at Y_l applied to dX_{l+1} (dY of the logits from
  the trusted labels), for every linear layer l:

  - forward: ``Y_l r ≈ B(X_l, W_l r) + b_l·r``;
  - input gradient (l >= 1): ``dX_l s ≈ B_x^T(dY_l, W_l s)``;
  - weight gradient: ``dW_l r ≈ B_w^T(X_l, dY_l r)`` for the *reported* dW_l;
  - bias gradient: ``db_l = Σ dY_l`` for the reported db_l;

  and the reported loss against the loss of the witness's logits.

Each projected 3x3 product is one matrix product with 9 columns followed by 9
shifted adds, so a conv layer's check reads its activations a few times
instead of multiplying them by every filter.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import hmac

import blake3
import jax
import jax.numpy as jnp
import numpy as np

from ginn_jax._src import errors, layered
from ginn_jax._src.boundary import Witness
from ginn_jax._src.trusted import commit
from ginn_jax._src.trusted.verify import Comparison

DIGEST_DOMAIN = b"ginn_jax/witness/v1"
CHECKS = ("forward", "input_grad", "weight_grad", "bias_grad")
_TINY = 1e-30
_HI = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class WitnessSpec:
  """The form a step's witness must have (from the model and the batch size).

  Attributes:
    outputs: (shape, dtype) of each linear layer's output Y_l.
    input_grads: (shape, dtype) of each linear layer's input gradient dX_l, l >= 1.
    names: each linear layer's parameter name.
  """

  outputs: tuple[tuple[tuple[int, ...], np.dtype], ...]
  input_grads: tuple[tuple[tuple[int, ...], np.dtype], ...]
  names: tuple[str, ...]

  @classmethod
  def of(cls, module: layered.LayeredModule, params, batch_shape, dtype=jnp.float32) -> "WitnessSpec":
    x = jax.ShapeDtypeStruct(tuple(batch_shape), dtype)
    _, outs = jax.eval_shape(
        lambda p, x: module.apply({"params": p}, x, train=False, return_outputs=True), params, x)
    taps = layered.tap_shapes(module, params, x)
    return cls(outputs=tuple((tuple(o.shape), np.dtype(o.dtype)) for o in outs),
               input_grads=tuple((tuple(t.shape), np.dtype(t.dtype)) for t in taps),
               names=layered.linear_names(module.layers))

  def check_names(self) -> tuple[str, ...]:
    """Names of the rows of `witness_errors`, in order."""
    rows = []
    for l, name in enumerate(self.names):
      rows += [f"layer {l} ({name}) {c}" for c in CHECKS if c != "input_grad" or l > 0]
    return (*rows, "loss")

  @property
  def nbytes(self) -> int:
    return int(sum(np.prod(s) * d.itemsize for s, d in (*self.outputs, *self.input_grads)))


def _violation(step: int, where: str, reason: str) -> errors.WitnessViolation:
  return errors.WitnessViolation(step=step, leaf=where, reason=reason)


def validate_witness(witness: object, *, step: int, spec: WitnessSpec,
                     device: jax.Device | None = None) -> tuple[list, list]:
  """Checks a witness's form and values; returns trusted copies of its outputs
  and input gradients.

  The arrays are first copied into trusted memory (to `device`, in one batched
  transfer; or to host numpy arrays when `device` is None) and only the copies
  are checked, so a worker that changes its buffers meanwhile or afterwards
  cannot change what was checked, hashed and used.

  Raises:
    WitnessViolation: the witness is missing, for another step, has a missing
      or extra layer, a wrong shape or dtype, or a NaN/Inf (the report is
      already committed, so a bad witness is a violation, not a rejection).
  """
  if not isinstance(witness, Witness):
    raise _violation(step, "witness", f"expected a Witness, got {type(witness).__name__}")
  s = witness.step
  if isinstance(s, (bool, np.bool_)) or not isinstance(s, (int, np.integer)) or s != step:
    raise _violation(step, "witness.step", f"the witness is for step {s!r}, not {step}")
  arrays, places = [], []
  for field, want in (("outputs", spec.outputs), ("input_grads", spec.input_grads)):
    got = getattr(witness, field)
    if not isinstance(got, (list, tuple)) or len(got) != len(want):
      n = len(got) if isinstance(got, (list, tuple)) else type(got).__name__
      raise _violation(step, f"witness.{field}",
                       f"expected {len(want)} arrays (one per linear layer{' after the first' if field == 'input_grads' else ''}), got {n}")
    for i, (a, (shape, dtype)) in enumerate(zip(got, want)):
      where = f"witness.{field}[{i}] ({spec.names[i + (field == 'input_grads')]})"
      if not isinstance(a, (jax.Array, np.ndarray)):
        raise _violation(step, where, f"is a {type(a).__name__}, not an array")
      if tuple(a.shape) != shape:
        raise _violation(step, where, f"has shape {tuple(a.shape)}, expected {shape}")
      if a.dtype != dtype:
        raise _violation(step, where, f"has dtype {a.dtype}, expected {dtype}")
      arrays.append(a)
      places.append(where)
  if device is None:
    copies = [np.array(jax.device_get(a), order="C", copy=True) for a in arrays]
  else:
    copies = commit.copy_to(arrays, device)
  for where, c in zip(places, copies):
    bad = commit.count_nonfinite(np.asarray(c))  # A zero-copy view on a CPU device.
    if bad:
      raise _violation(step, where, f"holds {bad} NaN/Inf value(s)")
  n = len(spec.outputs)
  return list(copies[:n]), list(copies[n:])


# The witness digest's hash function, recorded in the run's header. BLAKE3 on all
# cores: a witness is ~100 MiB for VGG-11, and SHA-256 (1.5 GB/s here) alone
# took a third of the check; BLAKE3 hashes the same bytes about 3x faster.
DIGEST_NAME = "blake3"


def witness_digest(step: int, report_digest: bytes, outputs, input_grads,
                   shard: int | None = None) -> bytes:
  """BLAKE3 (32 bytes) of the witness, bound to the step and the committed report:
  the domain, the step, the report digest, (with shards: the shard index as 4
  big-endian bytes,) then each array's dtype, shape and little-endian bytes
  (outputs, then input gradients, in layer order)."""
  h = blake3.blake3(DIGEST_DOMAIN, max_threads=blake3.blake3.AUTO)
  h.update(step.to_bytes(8, "big"))
  h.update(report_digest)
  if shard is not None:
    h.update(shard.to_bytes(4, "big"))
  commit.hash_leaves(h, [*outputs, *input_grads])
  return h.digest()


def freivalds_seed(key: bytes, step: int, digest: bytes) -> np.ndarray:
  """The threefry key data of the step's secret Gaussian vectors: a PRF of the
  audit secret's witness key, the step and the witness digest."""
  mac = hmac.new(key, b"ginn_jax/freivalds/v1" + step.to_bytes(8, "big") + digest,
                 hashlib.sha256).digest()
  return np.frombuffer(mac[:8], dtype=">u4").astype(np.uint32)


# -- projected products ------------------------------------------------------------------------


def _rel(lhs: jax.Array, rhs: jax.Array, scale: jax.Array | None = None) -> jax.Array:
  """(rel_l2, max_abs) of ``lhs - rhs``, relative to the trusted side's own
  quantity: `rhs`, or `scale` (same shape, cancellation-free) when given.

  Only what the trusted side computed may set the scale: a denominator taken
  from the worker's claim (the reported gradient, the witness) could be
  inflated by the worker to hide an error.
  """
  d = (lhs - rhs).ravel()
  ref = (rhs if scale is None else scale).ravel()
  return jnp.stack([jnp.linalg.norm(d) / jnp.maximum(jnp.linalg.norm(ref), _TINY),
                    jnp.max(jnp.abs(d)) / jnp.maximum(jnp.max(jnp.abs(ref)), _TINY)])


def _pads(op: layered.Conv, size: int, k: int) -> tuple[int, int]:
  if op.padding == "VALID":
    return 0, 0
  return (k - 1) // 2, k - 1 - (k - 1) // 2


def _shifted(z: jax.Array, out_hw: tuple[int, int], k: tuple[int, int], lo: tuple[int, int]):
  """A[n, h, w, i, j] = z[n, h + lo_h - i, w + lo_w - j, c(i, j)] (zero outside), with
  c(i, j) = i*kw + j when z has kh*kw channels and 0 when it has one."""
  (kh, kw), (H, W) = k, out_hw
  ho, wo = z.shape[1], z.shape[2]
  ah, aw = kh - 1 - lo[0], kw - 1 - lo[1]
  z = jnp.pad(z, ((0, 0), (ah, H + kh - 1 - ho - ah), (aw, W + kw - 1 - wo - aw), (0, 0)))
  cols = []
  for i in range(kh):
    for j in range(kw):
      c = i * kw + j if z.shape[3] > 1 else 0
      cols.append(z[:, kh - 1 - i:kh - 1 - i + H, kw - 1 - j:kw - 1 - j + W, c])
  return cols


def _bias_check(db: jax.Array, dy: jax.Array) -> jax.Array:
  """db = sum_n dY[n] in full (it is small), relative to sum_n |dY[n]|: the
  scale of the sum's rounding error, which cancellation across examples
  (a well-fit batch's logits gradient sums to almost nothing) cannot shrink."""
  return _rel(db, dy.sum(axis=0), jnp.abs(dy).sum(axis=0))


def _conv_checks(op: layered.Conv, x, y, dy, dx, kernel, bias, dk, db, r, s):
  kh, kw = op.kernel
  n, H, W, ci = x.shape
  co = kernel.shape[-1]
  lo = (_pads(op, H, kh)[0], _pads(op, W, kw)[0])
  hi = (_pads(op, H, kh)[1], _pads(op, W, kw)[1])
  x2 = x.reshape(-1, ci)
  # Forward: Y r = sum_ij Xpad[h+i, w+j] . (K r)[i, j] + b.r
  kr = jnp.dot(kernel.reshape(-1, co), r, precision=_HI).reshape(kh * kw, ci)
  z = jnp.dot(x2, kr.T, precision=_HI).reshape(n, H, W, kh * kw)
  z = jnp.pad(z, ((0, 0), (lo[0], hi[0]), (lo[1], hi[1]), (0, 0)))
  ho, wo = y.shape[1], y.shape[2]
  rhs = sum(z[:, i:i + ho, j:j + wo, i * kw + j] for i in range(kh) for j in range(kw))
  rows = [_rel(jnp.dot(y, r, precision=_HI), rhs + jnp.dot(bias, r, precision=_HI))]
  # Input gradient: dX s = sum_ij dYpad[h+lo-i, w+lo-j] . (K s)[i, j]
  if dx is not None:
    ks = jnp.einsum("ijco,c->ijo", kernel, s, precision=_HI).reshape(kh * kw, co)
    zs = jnp.dot(dy.reshape(-1, co), ks.T, precision=_HI).reshape(n, ho, wo, kh * kw)
    rows.append(_rel(jnp.dot(dx, s, precision=_HI), sum(_shifted(zs, (H, W), (kh, kw), lo))))
  # Weight gradient: (dK r)[i, j] = sum_nhw X[h, w] (dY r)[h+lo-i, w+lo-j]
  u = jnp.dot(dy, r, precision=_HI)[..., None]
  cols = jnp.stack(_shifted(u, (H, W), (kh, kw), lo), axis=-1).reshape(-1, kh * kw)
  dkr = jnp.dot(cols.T, x2, precision=_HI)  # [kh*kw, ci]
  rows.append(_rel(jnp.dot(dk.reshape(-1, co), r, precision=_HI).reshape(kh * kw, ci), dkr))
  rows.append(_bias_check(db, dy.reshape(-1, co)))
  return rows


def _dense_checks(x, y, dy, dx, kernel, bias, dk, db, r, s):
  rows = [_rel(jnp.dot(y, r, precision=_HI),
               jnp.dot(x, jnp.dot(kernel, r, precision=_HI), precision=_HI)
               + jnp.dot(bias, r, precision=_HI))]
  if dx is not None:
    rows.append(_rel(jnp.dot(dx, s, precision=_HI),
                     jnp.dot(dy, jnp.dot(s, kernel, precision=_HI), precision=_HI)))
  rows.append(_rel(jnp.dot(dk, r, precision=_HI),
                   jnp.dot(jnp.dot(dy, r, precision=_HI), x, precision=_HI)))
  rows.append(_bias_check(db, dy))
  return rows


@functools.partial(jax.jit, static_argnums=0)
def _prep(structure: layered.Structure, images, labels, indices, layer_key, outputs, input_grads):
  """What the checks need that does not depend on the secret vectors (so it can
  run while the witness is being hashed): X_l, dY_l and the loss.

  X_0 is the trusted batch (``images[indices]``), X_{l+1} = f_l(Y_l) from the
  witness; dY of the logits from the trusted labels, dY_l = VJP of f_l at Y_l
  applied to the witness's dX_{l+1}.
  """
  x, labels = images[indices], labels[indices]
  for i, op in structure.prefix:
    x = layered.op_forward(op, i, x, key=layer_key, train=True)
  xs, dys = [x], []
  for l, (seg, y) in enumerate(zip(structure.segments, outputs)):
    x, saved = layered.segment_forward(seg, y, key=layer_key, train=True)
    xs.append(x)
    dys.append(layered.segment_vjp(seg, saved, input_grads[l], key=layer_key, train=True))
  logits = outputs[-1]
  loss_ref = layered.cross_entropy(logits, labels)
  dys.append((jax.nn.softmax(logits) - jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype))
             / jnp.asarray(logits.shape[0], logits.dtype))
  return tuple(xs), tuple(dys), loss_ref


@functools.partial(jax.jit, static_argnums=0)
def _errors(structure: layered.Structure, params, grads, loss, prep, outputs, input_grads, seed):
  """[num_checks, 2] (rel_l2, max_abs) of every check, in `WitnessSpec.check_names` order."""
  xs, dys, loss_ref = prep
  vec_key = jax.random.wrap_key_data(seed, impl="threefry2x32")
  rows = []
  for l, (_, op) in enumerate(structure.linear):
    name = structure.names[l]
    kernel, bias = params[name]["kernel"], params[name]["bias"]
    dk, db = grads[name]["kernel"], grads[name]["bias"]
    kr, ks = jax.random.split(jax.random.fold_in(vec_key, l))
    r = jax.random.normal(kr, (kernel.shape[-1],), dtype=kernel.dtype)
    s = jax.random.normal(ks, (kernel.shape[-2],), dtype=kernel.dtype)
    dx = input_grads[l - 1] if l > 0 else None
    check = _conv_checks if isinstance(op, layered.Conv) else _dense_checks
    args = (xs[l], outputs[l], dys[l], dx, kernel, bias, dk, db, r, s)
    rows += check(op, *args) if isinstance(op, layered.Conv) else check(*args)
  rows.append(_rel(jnp.asarray(loss, jnp.float32)[None], loss_ref[None]))
  return jnp.stack(rows)


def witness_prep(module: layered.LayeredModule, images, labels, indices, layer_key, outputs,
                 input_grads):
  """Dispatches `_prep` (asynchronously; arguments on the trusted device)."""
  return _prep(layered.Structure.of(module.layers), images, labels, indices, layer_key,
               tuple(outputs), tuple(input_grads))


def witness_errors(module: layered.LayeredModule, spec: WitnessSpec, params, grads, loss, prep,
                   outputs, input_grads, seed) -> Comparison:
  """Runs every check of one witness (arguments on the trusted device; `prep`
  from `witness_prep`)."""
  errs = _errors(layered.Structure.of(module.layers), params, grads, loss, prep, tuple(outputs),
                 tuple(input_grads), seed)
  return Comparison(paths=spec.check_names(), errors=np.asarray(jax.device_get(errs), dtype=np.float64))
