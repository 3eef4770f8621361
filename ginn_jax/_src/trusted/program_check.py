"""The trusted side of a witness derived from the program (docs/design.md section 12).

The trusted side evaluates the step's own gradient program (`program.Program`)
on its own parameters, batch and key. At every witnessed product it takes the
worker's claimed output C, after a Freivalds check against the product's
inputs as the evaluation has them: ``C r ≈ A (B r)`` for a matrix product, with
r a secret Gaussian vector over the free dimensions of the side with fewer
(drawn from a seed fixed only after the witness was hashed). Every other op
is computed by the trusted side from those values. The reported gradient and
loss must agree with what the evaluation yields.

Rules, keyed by primitive and parameters (all O(size of the operands)):

* ``dot_general``: project the side with fewer free elements.
* ``conv_general_dilated``: project the output features. Without groups, the
  projected convolution is written as one matrix product whose columns are the
  kernel taps followed by shifted adds (few taps: the forward and
  input-gradient convolutions), or as one matrix product whose columns are the
  output positions (few outputs: the weight-gradient convolution); otherwise
  (groups, or neither small) a convolution with one output feature per group.
* ``select_and_scatter_add`` (the max-pool VJP) with windows equal to strides:
  strided slices and a first-maximum mask (XLA's tie rule: the first maximum in
  row-major window order), not XLA's select-and-scatter, which is slow on CPU.
"""
from __future__ import annotations

import functools
import itertools
import math
import weakref

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ginn_jax._src import program as program_lib
from ginn_jax._src.step import gather
from ginn_jax._src.trusted.verify import Comparison

_HI = lax.Precision.HIGHEST
_TINY = 1e-30
_SMALL = 64  # At most this many taps (or output positions) for a fast conv rule.


def _rel(lhs: jax.Array, rhs: jax.Array) -> jax.Array:
  """(rel_l2, max_abs) of ``lhs - rhs`` relative to the trusted side's `rhs`."""
  d = (lhs - rhs).ravel()
  ref = rhs.ravel()
  return jnp.stack([jnp.linalg.norm(d) / jnp.maximum(jnp.linalg.norm(ref), _TINY),
                    jnp.max(jnp.abs(d)) / jnp.maximum(jnp.max(jnp.abs(ref)), _TINY)])


def _f32(x):
  return x if x.dtype == jnp.float64 else x.astype(jnp.float32)


def _dot(a, b, contract, batch=((), ())):
  return lax.dot_general(a, b, (contract, batch), precision=_HI)


def dot_general_check(eqn, a, b, c, key):
  """(rel_l2, max_abs) of a claimed dot_general output `c`, projected."""
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  a, b, c = _f32(a), _f32(b), _f32(c)
  lfree = [i for i in range(a.ndim) if i not in lc and i not in lb]
  rfree = [i for i in range(b.ndim) if i not in rc and i not in rb]
  nb, nl = len(lb), len(lfree)
  if math.prod(b.shape[i] for i in rfree) <= math.prod(a.shape[i] for i in lfree):
    r = jax.random.normal(key, tuple(b.shape[i] for i in rfree), c.dtype)
    br = _dot(b, r, (tuple(rfree), tuple(range(len(rfree)))))
    rest = sorted((*rb, *rc))
    pos = {d: rest.index(d) for d in rest}
    ref = _dot(a, br, (tuple(lc), tuple(pos[d] for d in rc)), (tuple(lb), tuple(pos[d] for d in rb)))
    got = _dot(c, r, (tuple(range(nb + nl, c.ndim)), tuple(range(len(rfree)))))
  else:
    r = jax.random.normal(key, tuple(a.shape[i] for i in lfree), c.dtype)
    ra = _dot(a, r, (tuple(lfree), tuple(range(nl))))
    rest = sorted((*lb, *lc))
    pos = {d: rest.index(d) for d in rest}
    ref = _dot(ra, b, (tuple(pos[d] for d in lc), tuple(rc)), (tuple(pos[d] for d in lb), tuple(rb)))
    got = _dot(c, r, (tuple(range(nb, nb + nl)), tuple(range(nl))))
  return _rel(got, ref)


def _conv_projected(eqn, lhs, rhs, r):
  """The convolution of `lhs` with `rhs` projected on its output features by
  `r`: [N, *out_spatial] (canonical order). The large operands are read in
  their own layout (no transposed copies)."""
  p = eqn.params
  dn = p["dimension_numbers"]
  nsp = lhs.ndim - 2
  G = p["feature_group_count"]
  s, ld, rd = p["window_strides"], p["lhs_dilation"], p["rhs_dilation"]
  pads = p["padding"]
  lf = dn.lhs_spec[1]
  S = tuple(lhs.shape[d] for d in dn.lhs_spec[2:])
  k = tuple(rhs.shape[d] for d in dn.rhs_spec[2:])
  O, I = rhs.shape[dn.rhs_spec[0]], rhs.shape[dn.rhs_spec[1]]
  P = tuple(lo + hi + (n - 1) * d + 1 if n else lo + hi for (lo, hi), n, d in zip(pads, S, ld))
  So = tuple((pp - ((kk - 1) * dd + 1)) // ss + 1 for pp, kk, dd, ss in zip(P, k, rd, s))
  T, nO = math.prod(k), math.prod(So)
  pad_sp = [(lo, hi, d - 1) for (lo, hi), d in zip(pads, ld)]
  zero = jnp.zeros((), lhs.dtype)
  if G == 1 and (T <= _SMALL or nO <= _SMALL):
    # rhs projected on its output features, read in place: [I, *k].
    rr = jnp.tensordot(rhs, r, axes=([dn.rhs_spec[0]], [0]), precision=_HI)
    rest = [d for d in range(rhs.ndim) if d != dn.rhs_spec[0]]
    rr = jnp.transpose(rr, [rest.index(dn.rhs_spec[1])] + [rest.index(d) for d in dn.rhs_spec[2:]])
  if G == 1 and T <= _SMALL and T <= nO:  # Few taps: one product with T columns, then shifted adds.
    z = jnp.tensordot(lhs, rr.reshape(I, T), axes=([lf], [0]), precision=_HI)  # lhs dims but C, then T
    rest = [d for d in range(lhs.ndim) if d != lf]
    z = jnp.transpose(z, [rest.index(dn.lhs_spec[0])] + [rest.index(d) for d in dn.lhs_spec[2:]]
                      + [lhs.ndim - 1])  # [N, *S, T]: an identity for NHWC
    z = lax.pad(z, zero, [(0, 0, 0), *pad_sp, (0, 0, 0)])
    out = None
    for t, tap in enumerate(itertools.product(*(range(kk) for kk in k))):
      start = [i * d for i, d in zip(tap, rd)]
      limit = [st + (so - 1) * ss + 1 for st, so, ss in zip(start, So, s)]
      part = lax.slice(z, (0, *start, t), (z.shape[0], *limit, t + 1), (1, *s, 1))[..., 0]
      out = part if out is None else out + part
    return out
  if G == 1 and nO <= _SMALL:  # Few outputs: one product with nO columns.
    # Column o holds rr where output o reads lhs, in lhs's unpadded coordinates (the
    # padding is zeros, so it contributes nothing): lhs itself is neither padded nor copied.
    if all(d == 1 for d in ld):
      cols = []
      for o in itertools.product(*(range(n) for n in So)):
        cfg = [(0, 0, 0)]
        for oi, ss, n, kk, dd, (lo, _) in zip(o, s, S, k, rd, pads):
          low = oi * ss - lo
          cfg.append((low, n - low - ((kk - 1) * dd + 1), dd - 1))
        cols.append(lax.pad(rr, zero, cfg))
      cols = jnp.stack(cols, axis=-1)  # [I, *S, nO]
      out = _dot(lhs, cols, ((lf, *dn.lhs_spec[2:]), tuple(range(1 + nsp))))  # [N, nO]
      return out.reshape(out.shape[0], *So)
    lhs_c = jnp.transpose(lhs, dn.lhs_spec)  # Dilated input: pad it (with its interior zeros).
    lhs_p = lax.pad(lhs_c, zero, [(0, 0, 0), (0, 0, 0), *pad_sp])
    cols = []
    for o in itertools.product(*(range(n) for n in So)):
      cfg = [(0, 0, 0)] + [(oi * ss, pp - (oi * ss + (kk - 1) * dd + 1), dd - 1)
                           for oi, ss, pp, kk, dd in zip(o, s, P, k, rd)]
      cols.append(lax.pad(rr, zero, cfg))
    cols = jnp.stack(cols, axis=-1)  # [I, *P, nO]
    out = _dot(lhs_p, cols, (tuple(range(1, 2 + nsp)), tuple(range(1 + nsp))))
    return out.reshape(out.shape[0], *So)
  # A convolution with one output feature per group.
  rhs_c = jnp.transpose(rhs, dn.rhs_spec)  # [O, I, *k]
  lhs_c = jnp.transpose(lhs, dn.lhs_spec)  # [N, C, *S]
  rg = (rhs_c * r.reshape(O, *([1] * (nsp + 1)))).reshape(G, O // G, I, *k).sum(axis=1)
  spec = tuple(range(nsp + 2))
  out = lax.conv_general_dilated(lhs_c, rg, s, pads, ld, rd,
                                 dimension_numbers=lax.ConvDimensionNumbers(spec, spec, spec),
                                 feature_group_count=G, precision=_HI)
  return out.sum(axis=1)


def conv_check(eqn, lhs, rhs, c, key):
  """(rel_l2, max_abs) of a claimed convolution output `c`, projected on its
  output features."""
  dn = eqn.params["dimension_numbers"]
  lhs, rhs, c = _f32(lhs), _f32(rhs), _f32(c)
  O = rhs.shape[dn.rhs_spec[0]]
  r = jax.random.normal(key, (O,), c.dtype)
  of = dn.out_spec[1]
  got = jnp.tensordot(c, r, axes=([of], [0]), precision=_HI)
  rest = [d for d in range(c.ndim) if d != of]
  got = jnp.transpose(got, [rest.index(dn.out_spec[0])] + [rest.index(d) for d in dn.out_spec[2:]])
  return _rel(got, _conv_projected(eqn, lhs, rhs, r))


def select_and_scatter_add_fast(eqn, source, operand):
  """The max-pool VJP with windows equal to strides, in O(size): `source` goes
  to the first maximum of each window in row-major order; None when the
  parameters are not of that kind."""
  p = eqn.params
  w, st, pads = p["window_dimensions"], p["window_strides"], p["padding"]
  if p["select_prim"] is not lax.ge_p or tuple(w) != tuple(st):
    return None
  padded = [n + lo + hi for n, (lo, hi) in zip(operand.shape, pads)]
  if any(pp != ww * ns for pp, ww, ns in zip(padded, w, source.shape)):
    return None
  neg = jnp.array(-jnp.inf if jnp.issubdtype(operand.dtype, jnp.floating) else
                  jnp.iinfo(operand.dtype).min, operand.dtype)
  op_p = lax.pad(operand, neg, [(lo, hi, 0) for lo, hi in pads])
  real = lax.pad(jnp.ones(operand.shape, bool), False, [(lo, hi, 0) for lo, hi in pads])
  offsets = list(itertools.product(*(range(ww) for ww in w)))
  limits = lambda off: [o + (ns - 1) * ww + 1 for o, ns, ww in zip(off, source.shape, w)]  # noqa: E731
  members = [lax.slice(op_p, off, limits(off), w) for off in offsets]
  inside = [lax.slice(real, off, limits(off), w) for off in offsets]  # XLA never selects padding.
  m = functools.reduce(jnp.maximum, members)
  taken = jnp.zeros(source.shape, bool)
  zero = jnp.zeros((), source.dtype)
  parts = []
  for mk, ik in zip(members, inside):
    t = (mk == m) & ik & ~taken
    taken = taken | t
    parts.append(jnp.where(t, source, zero))
  out = jnp.stack(parts, axis=-1).reshape(*source.shape, *w)  # [*src, *w]
  nd = source.ndim
  out = jnp.transpose(out, [j for i in range(nd) for j in (i, nd + i)]).reshape(padded)
  return lax.slice(out, [lo for lo, _ in pads], [lo + n for (lo, _), n in zip(pads, operand.shape)])


class CheckHook(program_lib.Hook):
  """The trusted side's hook: substitutes each witnessed product's claimed
  output after its Freivalds check; computes the rest."""

  def __init__(self, plan: program_lib.WitnessPlan, claims, vec_key):
    self.plan = plan
    self.claims = list(claims)
    self.vec_key = vec_key
    self.rows: list = []
    self._next = 0

  def product(self, index, eqn, invals, where):
    if not self.plan.products[index].witnessed:
      return program_lib._bind(eqn, invals)[0]
    claim = self.claims[self._next]
    self._next += 1
    key = jax.random.fold_in(self.vec_key, index)
    check = dot_general_check if eqn.primitive.name == "dot_general" else conv_check
    self.rows.append(check(eqn, invals[0], invals[1], claim, key))
    return claim

  def select_and_scatter_add(self, eqn, invals):
    out = select_and_scatter_add_fast(eqn, *invals)
    return program_lib._bind(eqn, invals) if out is None else [out]


def _check_impl(program, params, data, indices, key, claims, reported, loss, seed, frozen=None):
  vec_key = jax.random.wrap_key_data(seed, impl="threefry2x32")
  hook = CheckHook(program.plan, claims, vec_key)
  ref_loss, ref_grads = program.run(hook, params, gather(data, indices), key, frozen)
  rows = list(hook.rows)
  rows += [_rel(_f32(g), _f32(r)) for g, r in zip(reported, jax.tree_util.tree_leaves(ref_grads))]
  rows.append(_rel(jnp.asarray(loss, jnp.float32)[None], jnp.asarray(ref_loss, jnp.float32)[None]))
  return jnp.stack(rows)


_JITTED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _jitted(program):
  fn = _JITTED.get(program)
  if fn is None:
    fn = _JITTED[program] = jax.jit(functools.partial(_check_impl, program))
  return fn


def check_names(plan: program_lib.WitnessPlan, leaf_paths) -> tuple[str, ...]:
  """Names of the rows of `program_errors`, in order."""
  grads = [p for p in leaf_paths][:-1] if leaf_paths and leaf_paths[-1] == "loss" else list(leaf_paths)
  return (*(p.describe() for p in plan.witnessed), *(f"gradient {p}" for p in grads), "loss")


def program_errors(program, leaf_paths, params, data, indices, key, claims, reported, loss,
                   seed, frozen=None) -> Comparison:
  """Runs the whole check of one witness (arguments on the trusted device):
  every product's Freivalds check, then the reported gradient's leaves and
  the loss against the evaluation. `frozen`: the trusted copy of the model's
  frozen parameters, if it has any (a product with a frozen weight W0 is
  checked against it, e.g. ``X (W0 r)``)."""
  with jax.default_matmul_precision("highest"):
    errs = _jitted(program)(params, data, indices, key, tuple(claims), tuple(reported), loss, seed,
                            frozen)
  return Comparison(paths=check_names(program.plan, leaf_paths),
                    errors=np.asarray(jax.device_get(errs), dtype=np.float64))


def _gradient_impl(program, params, data, indices, key, claims, seed, frozen=None):
  vec_key = jax.random.wrap_key_data(seed, impl="threefry2x32")
  hook = CheckHook(program.plan, claims, vec_key)
  ref_loss, ref_grads = program.run(hook, params, gather(data, indices), key, frozen)
  rows = list(hook.rows)
  return (jnp.stack(rows) if rows else jnp.zeros((0, 2), jnp.float32)), ref_loss, \
      jax.tree_util.tree_leaves(ref_grads)


_GRADIENT: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def program_gradient(program, params, data, indices, key, claims, seed, frozen=None):
  """The gradient a witness yields (an ``"aggregate"`` run's shard check,
  docs/design.md section 11.2): the program evaluated with the claimed
  products, each after its Freivalds check.

  Returns:
    ``(errors, loss, grads)``: the Freivalds checks' ``[num_checks, 2]``
    (rel_l2, max_abs) errors as a float64 host array (names:
    ``plan.witnessed``), and the evaluation's loss and gradient leaves (on the
    trusted device).
  """
  fn = _GRADIENT.get(program)
  if fn is None:
    fn = _GRADIENT[program] = jax.jit(functools.partial(_gradient_impl, program))
  with jax.default_matmul_precision("highest"):
    rows, loss, grads = fn(params, data, indices, key, tuple(claims), seed, frozen)
  return np.asarray(jax.device_get(rows), dtype=np.float64), loss, grads
