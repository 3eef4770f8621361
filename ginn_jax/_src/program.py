"""Witnesses derived from the program (docs/design.md section 12).

The gradient step is ``jax.value_and_grad`` of the model's pure loss. Its
jaxpr lists every matrix product (``dot_general``) and convolution
(``conv_general_dilated``), forward and backward. This module

* traces that jaxpr for a model and a batch shape (`trace_program`) and reads
  its *witness plan* (`WitnessPlan`): each product's primitive, shapes and
  dtypes, how it is checked, and a digest of the whole program;
* evaluates the program with a hook at every product (`evaluate`): the
  worker's hook computes the product and records its output (the witness);
  the trusted side's hook substitutes the worker's claimed output after a
  Freivalds check (``trusted/program_check.py``). Every other op is bound as
  traced, so both sides run the same program.

Calls (``jit``, ``custom_jvp_call``, ``custom_vjp_call``, remat) are inlined;
``scan`` with products inside is unrolled, one product per iteration; any
other control flow (``while``, ``cond``, ...) with a product inside is refused
with `UnsupportedProgram`, which names it. Nothing runs with an unchecked
product.

Shared by the worker (`ginn_jax._src.step`) and the trusted check; neither
side's code is imported here.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jex_core

from ginn_jax._src.errors import GinnError

PRODUCTS = ("dot_general", "conv_general_dilated")
# A matrix product that sums over at most this many terms per output is re-computed, not
# witnessed: its K multiply-adds per output cost the trusted side less than receiving,
# hashing and projecting a claimed output (about 24 bytes of memory traffic per element)
# and its operands (attention over a short context, small heads). Measured on CPU.
RECOMPUTE_CONTRACTION = 64
# The same for a convolution (kernel taps times input features per group), lower: XLA's CPU
# convolution of a few channels runs at about 8 GFMA/s here, so its break-even against the
# witness's ~24 bytes per output element is near 24 terms. Measured: the MNIST CNN's first
# layer (9 terms) re-computes in under 2 ms; VGG-11's (27 terms) took 27 ms against its
# check's 4 ms, so it is witnessed.
RECOMPUTE_CONV_TERMS = 16
PLAN_VERSION = 1
# Calls inlined: (primitive name, parameter holding the callee).
_CALLS = {
    "pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr", "remat": "jaxpr", "checkpoint": "jaxpr",
    "remat2": "jaxpr",
}


class UnsupportedProgram(GinnError, ValueError):
  """The loss's gradient program has a product the witness check cannot reach
  (inside control flow it does not unroll)."""


def _subjaxprs(params: dict) -> list:
  out = []
  for v in params.values():
    for x in (v if isinstance(v, (tuple, list)) else (v,)):
      if isinstance(x, jex_core.ClosedJaxpr):
        out.append(x.jaxpr)
      elif isinstance(x, jex_core.Jaxpr):
        out.append(x)
  return out


def _has_product(jaxpr) -> bool:
  return any(e.primitive.name in PRODUCTS or any(_has_product(j) for j in _subjaxprs(e.params))
             for e in jaxpr.eqns)


def _callee(eqn):
  """(jaxpr, consts) of an inlinable call, else None."""
  name = eqn.primitive.name
  if name not in _CALLS:
    return None
  j = eqn.params.get(_CALLS[name])
  if isinstance(j, jex_core.ClosedJaxpr):
    return j.jaxpr, j.consts
  if isinstance(j, jex_core.Jaxpr):
    return j, []
  return None


def _bind(eqn, invals):
  got = eqn.primitive.get_bind_params(eqn.params)
  subfuns, params = got if isinstance(got, tuple) else ((), got)  # (jax < 0.8: with subfuns)
  ctx = getattr(getattr(eqn, "ctx", None), "manager", None)
  if ctx is None:
    out = eqn.primitive.bind(*subfuns, *invals, **params)
  else:
    with ctx:
      out = eqn.primitive.bind(*subfuns, *invals, **params)
  return out if eqn.primitive.multiple_results else [out]


class Hook:
  """What happens at each product; the default computes it."""

  def product(self, index: int, eqn, invals: list, where: str) -> Any:
    return _bind(eqn, invals)[0]

  def select_and_scatter_add(self, eqn, invals):
    return _bind(eqn, invals)


def evaluate(jaxpr, consts: Sequence, args: Sequence, hook: Hook, *, where: str = "",
             counter: list | None = None) -> list:
  """Evaluates `jaxpr` like ``jax.core.eval_jaxpr``, calling `hook.product`
  at every product in evaluation order (the plan's order)."""
  counter = [0] if counter is None else counter
  env: dict = {}

  def read(v):
    return v.val if isinstance(v, jex_core.Literal) else env[v]

  for v, x in zip(jaxpr.constvars, consts):
    env[v] = x
  for v, x in zip(jaxpr.invars, args):
    env[v] = x
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    name = eqn.primitive.name
    if name in PRODUCTS:
      outvals = [hook.product(counter[0], eqn, invals, where)]
      counter[0] += 1
    elif name == "select_and_scatter_add":
      outvals = hook.select_and_scatter_add(eqn, invals)
    elif (callee := _callee(eqn)) is not None:
      sub, sub_consts = callee
      outvals = evaluate(sub, sub_consts, invals, hook, where=f"{where}{name}/", counter=counter)
    elif name == "scan" and _has_product(eqn.params["jaxpr"].jaxpr):
      outvals = _unrolled_scan(eqn, invals, hook, where, counter)
    elif any(_has_product(j) for j in _subjaxprs(eqn.params)):
      raise UnsupportedProgram(
          f"the loss's gradient program has a matrix product inside `{where}{name}`, which the "
          f"witness check cannot follow ({name} is not unrolled: only calls and scans of a static "
          f"length are). Write that part without {name} (e.g. a Python loop or a scan in place of "
          f"a while loop, jnp.where in place of lax.cond), or check this model by re-computation "
          f"only (p_witness=0)")
    else:
      outvals = _bind(eqn, invals)
    for v, x in zip(eqn.outvars, outvals):
      if not isinstance(v, jex_core.DropVar):
        env[v] = x
  return [read(v) for v in jaxpr.outvars]


def _unrolled_scan(eqn, invals, hook, where, counter):
  """A scan with products inside, one iteration at a time (its products are
  checked per iteration)."""
  p = eqn.params
  body = p["jaxpr"]
  nc, nk, length = p["num_consts"], p["num_carry"], p["length"]
  consts, carry, xs = invals[:nc], list(invals[nc:nc + nk]), invals[nc + nk:]
  ys: list[list] = []
  order = range(length - 1, -1, -1) if p["reverse"] else range(length)
  for i in order:
    x_i = [lax.index_in_dim(x, i, keepdims=False) for x in xs]
    out = evaluate(body.jaxpr, body.consts, [*consts, *carry, *x_i], hook,
                   where=f"{where}scan[{i}]/", counter=counter)
    carry, y = out[:nk], out[nk:]
    ys.append(y)
  if p["reverse"]:
    ys.reverse()
  ys_avals = [v.aval for v in eqn.outvars[nk:]]
  stacked = [jnp.stack([y[j] for y in ys]) if ys else jnp.zeros(a.shape, a.dtype)
             for j, a in enumerate(ys_avals)]
  return [*carry, *stacked]


# -- the plan --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Product:
  """One product of the plan.

  Attributes:
    index: position in the plan (evaluation order).
    primitive: ``dot_general`` or ``conv_general_dilated``.
    lhs, rhs, out: (shape, dtype name) of the operands and the output.
    rule: how the trusted side checks it: "freivalds" (a claimed output,
      projected on a secret Gaussian vector) or "recompute" (no claim: the
      product is cheap to compute or has no float output).
    where: the calls it sits in (``jit/``, ``scan[3]/``, ...).
    flops: multiply-adds of the product.
  """

  index: int
  primitive: str
  lhs: tuple[tuple[int, ...], str]
  rhs: tuple[tuple[int, ...], str]
  out: tuple[tuple[int, ...], str]
  rule: str
  where: str
  flops: int

  @property
  def witnessed(self) -> bool:
    return self.rule != "recompute"

  def describe(self) -> str:
    s = lambda a: f"{a[1]}{list(a[0])}"  # noqa: E731
    return f"product {self.index} ({self.primitive} {s(self.lhs)} x {s(self.rhs)} -> {s(self.out)})"


@dataclasses.dataclass(frozen=True)
class WitnessPlan:
  """What the witness check of a model's step checks (docs/design.md section 12).

  Attributes:
    products: every product of the gradient program, in evaluation order
      (``len(plan.products)`` is the number of products).
    digest: SHA-256 (hex) of the canonical program (every op, its operands'
      shapes and dtypes, its parameters and the data flow) and its constants.
    ops: how many other (re-computed) ops the program has, by primitive.
    jax_version: the jax that traced it.
  """

  products: tuple[Product, ...]
  digest: str
  ops: dict[str, int]
  jax_version: str

  @property
  def witnessed(self) -> tuple[Product, ...]:
    """The products whose output the worker reports (the witness, in order)."""
    return tuple(p for p in self.products if p.witnessed)

  @property
  def witness_bytes(self) -> int:
    return int(sum(math.prod(p.out[0]) * np.dtype(p.out[1]).itemsize for p in self.witnessed))

  @property
  def witness_mib(self) -> float:
    return self.witness_bytes / 2**20

  def summary(self) -> dict[str, Any]:
    """The header's ``witness_plan``: products, witness size, digest, jax version."""
    return {"products": len(self.products), "witnessed": len(self.witnessed),
            "witness_mib": round(self.witness_mib, 3), "digest": self.digest,
            "jax_version": self.jax_version, "version": PLAN_VERSION}

  def __str__(self) -> str:
    lines = [f"witness plan {self.digest[:16]} (jax {self.jax_version}): {len(self.products)} products, "
             f"{len(self.witnessed)} checked by witness ({self.witness_mib:.2f} MiB), "
             f"{sum(self.ops.values())} other ops re-computed by the trusted side"]
    for p in self.products:
      lines.append(f"  {p.describe():<70} {p.rule:<10} {p.where}")
    top = sorted(self.ops.items(), key=lambda kv: -kv[1])[:12]
    lines.append("  re-computed: " + ", ".join(f"{k} x{v}" for k, v in top))
    return "\n".join(lines)


def _aval(v) -> tuple[tuple[int, ...], str]:
  a = v.aval
  return tuple(int(d) for d in a.shape), str(a.dtype)


def _free_size(shape, contract, batch) -> int:
  return math.prod(d for i, d in enumerate(shape) if i not in contract and i not in batch)


def product_rule(eqn) -> str:
  """How a product is checked: "freivalds", or "recompute" when it has no float
  output, a side with a single free element (then computing it costs no more
  than reading its operands), or at most `RECOMPUTE_CONTRACTION` terms per
  output (a matrix product) or `RECOMPUTE_CONV_TERMS` (a convolution)."""
  out = eqn.outvars[0].aval
  if not jnp.issubdtype(out.dtype, jnp.floating):
    return "recompute"
  lhs, rhs = (v.aval for v in eqn.invars)
  if eqn.primitive.name == "dot_general":
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    if _free_size(lhs.shape, lc, lb) == 1 or _free_size(rhs.shape, rc, rb) == 1:
      return "recompute"
    if math.prod(lhs.shape[i] for i in lc) <= RECOMPUTE_CONTRACTION:
      return "recompute"
    return "freivalds"
  if eqn.params["batch_group_count"] != 1:
    return "recompute"
  dn = eqn.params["dimension_numbers"]
  if rhs.shape[dn.rhs_spec[0]] == 1:  # One output feature: it is its own projection.
    return "recompute"
  if math.prod(rhs.shape) // rhs.shape[dn.rhs_spec[0]] <= RECOMPUTE_CONV_TERMS:
    return "recompute"  # A first layer's 3x3 convolution of one channel.
  return "freivalds"


def _flops(eqn) -> int:
  lhs, rhs = (v.aval for v in eqn.invars)
  out = eqn.outvars[0].aval
  if eqn.primitive.name == "dot_general":
    (lc, _), _ = eqn.params["dimension_numbers"]
    return int(math.prod(out.shape) * math.prod(lhs.shape[i] for i in lc))
  dn = eqn.params["dimension_numbers"]
  per_out = math.prod(rhs.shape) // rhs.shape[dn.rhs_spec[0]]
  return int(math.prod(out.shape) * per_out)


class _PlanHook(Hook):
  def __init__(self):
    self.products: list[Product] = []

  def product(self, index, eqn, invals, where):
    self.products.append(Product(index=index, primitive=eqn.primitive.name, lhs=_aval(eqn.invars[0]),
                                 rhs=_aval(eqn.invars[1]), out=_aval(eqn.outvars[0]),
                                 rule=product_rule(eqn), where=where, flops=_flops(eqn)))
    return _bind(eqn, invals)[0]


def _canonical(jaxpr, h, names: dict, ops: dict) -> None:
  """Feeds a canonical text of `jaxpr` (ops, avals, params, data flow; no
  object addresses) to the hash `h`."""

  def name(v):
    if isinstance(v, jex_core.Literal):
      return f"lit({v.val!r}:{v.aval.dtype})"
    if v not in names:
      names[v] = f"v{len(names)}"
    return names[v]

  h.update(("in " + " ".join(f"{name(v)}:{v.aval.str_short()}" for v in (*jaxpr.constvars, *jaxpr.invars))).encode())
  for e in jaxpr.eqns:
    ops[e.primitive.name] = ops.get(e.primitive.name, 0) + 1
    parts = [e.primitive.name, " ".join(name(v) for v in e.invars), "->",
             " ".join(f"{name(v)}:{v.aval.str_short()}" for v in e.outvars)]
    for k in sorted(e.params):
      v = e.params[k]
      if isinstance(v, (jex_core.ClosedJaxpr, jex_core.Jaxpr)):
        parts.append(f"{k}=<jaxpr>")
        sub = v.jaxpr if isinstance(v, jex_core.ClosedJaxpr) else v
        _canonical(sub, h, names, ops)
      elif callable(v) and not isinstance(v, type):
        parts.append(f"{k}=<{type(v).__name__}>")
      else:
        parts.append(f"{k}={_stable_repr(v)}")
    h.update(("\n" + " ".join(parts)).encode())
  h.update(("\nout " + " ".join(name(v) for v in jaxpr.outvars)).encode())


def _stable_repr(v) -> str:
  if isinstance(v, (tuple, list)):
    return "(" + ",".join(_stable_repr(x) for x in v) + ")"
  if isinstance(v, (jex_core.ClosedJaxpr, jex_core.Jaxpr)):
    return "<jaxpr>"
  if callable(v) and not isinstance(v, type):
    return f"<{type(v).__name__}>"
  r = repr(v)
  return r if " at 0x" not in r else f"<{type(v).__name__}>"


# -- tracing a model's step ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Program:
  """A model's gradient program for one batch shape."""

  closed: Any  # jax.extend.core.ClosedJaxpr of grad_fn(params, batch, key) -> (loss, grads)
  in_tree: Any
  out_tree: Any
  plan: WitnessPlan

  def run(self, hook: Hook, params, batch, key, frozen=None):
    """(loss, grads) of the program with `hook` at every product (traceable).
    `frozen`: the frozen parameters, for a model that has them (an input of
    the program like the trained ones, never differentiated)."""
    args = jax.tree_util.tree_leaves((params, batch, key, frozen))
    out = evaluate(self.closed.jaxpr, self.closed.consts, args, hook)
    return jax.tree_util.tree_unflatten(self.out_tree, out)


def _grad_fn(loss_fn):
  def grad_fn(params, batch, key, frozen=None):
    if frozen is None:
      return jax.value_and_grad(lambda p: loss_fn(p, batch, key=key))(params)
    return jax.value_and_grad(lambda p: loss_fn(p, batch, key=key, frozen=frozen))(params)
  return grad_fn


def trace_program(loss_fn: Callable, params, batch, key, frozen=None) -> Program:
  """Traces ``value_and_grad`` of `loss_fn` at the shapes of (params, batch,
  key) (arrays or ShapeDtypeStructs) and reads its plan. With `frozen` (a
  model's frozen parameters, docs/design.md section 13) the loss is called
  with ``frozen=`` and they are inputs of the program: a product with a
  frozen weight is witnessed like any other, against the trusted copy.

  Raises:
    UnsupportedProgram: a product sits inside control flow that is not
      unrolled (named in the message).
  """
  shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype),
                                  (params, batch, key, frozen))
  with jax.default_matmul_precision("highest"):
    closed, out_shape = jax.make_jaxpr(_grad_fn(loss_fn), return_shape=True)(*shapes)
  in_tree = jax.tree_util.tree_structure(shapes)
  out_tree = jax.tree_util.tree_structure(out_shape)
  hook = _PlanHook()
  abstract = jax.tree_util.tree_leaves(shapes)
  # Walk with shape evaluation only: builds the product list in evaluation order.
  jax.eval_shape(lambda *a: evaluate(closed.jaxpr, closed.consts, a, hook), *abstract)
  # The rules that decide what is witnessed are part of the plan: another rule, another witness.
  h = hashlib.sha256(f"ginn_jax/witness-plan/v{PLAN_VERSION}\nrecompute_contraction<="
                     f"{RECOMPUTE_CONTRACTION}\nrecompute_conv_terms<={RECOMPUTE_CONV_TERMS}\n".encode())
  ops: dict[str, int] = {}
  _canonical(closed.jaxpr, h, {}, ops)
  for c in closed.consts:
    a = np.asarray(c)
    h.update(f"\nconst {a.dtype.str}{a.shape}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
  for p in PRODUCTS:
    ops.pop(p, None)
  for call in _CALLS:
    ops.pop(call, None)
  plan = WitnessPlan(products=tuple(hook.products), digest=h.hexdigest(), ops=ops,
                     jax_version=jax.__version__)
  return Program(closed=closed, in_tree=in_tree, out_tree=out_tree, plan=plan)


class RecordHook(Hook):
  """The worker's hook: computes each product and keeps the witnessed ones."""

  def __init__(self, plan: WitnessPlan):
    self.plan = plan
    self.recorded: list = []

  def product(self, index, eqn, invals, where):
    out = _bind(eqn, invals)[0]
    if self.plan.products[index].witnessed:
      self.recorded.append(out)
    return out


def loss_grads_and_products(program: Program, params, batch, key, frozen=None):
  """``(loss, grads, products)``: the step, with the output of every witnessed
  product in plan order (traceable; the worker jits it)."""
  hook = RecordHook(program.plan)
  loss, grads = program.run(hook, params, batch, key, frozen)
  return loss, grads, hook.recorded


@functools.lru_cache(maxsize=32)
def _program_cached(owner, func, shapes_key):
  loss_fn = func.__get__(owner) if owner is not None else func
  params, batch, key, frozen = shapes_key.unwrap()
  return trace_program(loss_fn, params, batch, key, frozen)


class _ShapesKey:
  """A hashable key for a tree of ShapeDtypeStructs."""

  def __init__(self, tree):
    self.tree = tree
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    self._h = (treedef, tuple((tuple(l.shape), str(l.dtype)) for l in leaves))

  def unwrap(self):
    return self.tree

  def __hash__(self):
    return hash(self._h)

  def __eq__(self, other):
    return isinstance(other, _ShapesKey) and self._h == other._h


def program_of(loss_fn: Callable, params, batch, key, frozen=None) -> Program:
  """`trace_program`, cached per loss function and shapes."""
  shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype),
                                  (params, batch, key, frozen))
  return _program_cached(getattr(loss_fn, "__self__", None), getattr(loss_fn, "__func__", loss_fn),
                         _ShapesKey(shapes))


def witness_plan(model, batch) -> WitnessPlan:
  """The witness plan of `model`'s step on batches shaped like `batch`: which
  products the witness check verifies by Freivalds and which ops the trusted
  side re-computes (``print(plan)`` shows them).

  Args:
    model: any model with ``init(key)`` and a pure ``loss(params, batch, *, key)``.
    batch: one batch (any pytree of arrays, or ShapeDtypeStructs), e.g.
      ``ginn.Batch(images[:64], labels[:64])``.

  Returns:
    The `WitnessPlan`; ``len(plan.products)`` is the number of products.

  Raises:
    UnsupportedProgram: a product sits inside control flow the check does not unroll.

  Example::

    plan = ginn.witness_plan(model, ginn.Batch(ds.train_images[:64], ds.train_labels[:64]))
    print(len(plan.products), plan.witness_mib)
  """
  key = jax.eval_shape(lambda: jax.random.key(0))
  params = jax.eval_shape(model.init, key)
  frozen = (jax.eval_shape(model.frozen_params, key) if getattr(model, "frozen_params", None)
            is not None else None)
  return program_of(model.loss, params, batch, key, frozen).plan
