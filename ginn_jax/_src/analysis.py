"""What verification at rate p and a clip C guarantee (docs/design.md sections 1, 4, 8).

Detection: a backdoor that needs k malicious steps, each verified
independently with probability p, escapes with probability (1-p)^k. With
witness checks (Freivalds, design.md section 10) a step is also challenged,
independently, with probability p_witness; a malicious step escapes only if
neither coin comes up, so the attack escapes with ((1-p)(1-p_witness))^k.

Deviation: with the trusted update ``clip -> (weight decay) -> SGD(eta, m)``,
the honest and the malicious update of one step differ only through the
clipped gradient, so

* element-wise clip C: every coordinate moves at most ``2 * eta * C`` away
  from where the honest step would have put it;
* global-norm clip C: the whole parameter vector moves at most ``2 * eta * C``
  away in L2;
* momentum m carries that deviation into later updates, with total effect at
  most ``1/(1-m)`` times the immediate one;
* no clip: unbounded;
* Adam (and other normalising optimizers): the update is divided by a running
  gradient scale the attacker also controls, so C does **not** bound it this
  way; this module refuses to state a bound for them, and for any optax
  transformation it cannot name;
* an `OptimizerSpec` "sgd" or "momentum" is bounded as SGD, with eta the
  largest learning rate its schedule reaches.

Shards (docs/design.md, "Shards"): with S shards each clipped before the
mean, an attacker that corrupts m of them moves the mean gradient by at most
``m * 2C / S`` (per coordinate, or in L2 for a global-norm clip), so one step
by ``2 * eta * C * m / S``; each shard has its own coin, so a step whose m
corrupted shards all differ from the truth is caught with probability
``1 - (1-p)^m``: p for a one-shard attacker, ``1 - (1-p)^S`` for one that
corrupts every shard (`shard_detection_probability`, `shard_deviation_bound`).

Aggregate shards (docs/design.md section 11.2): the worker reports the mean,
the trusted side clips it (a malicious step moves it by up to 2C, not 2C/S)
and checks it with a secret projection: a changed mean needs a lie about at
least one shard, caught when that shard's coin comes up
(`aggregate_detection_probability`, `aggregate_deviation_bound`,
`projection_miss_probability`); the trusted bytes per step do not grow with S
(`shard_trusted_bytes`, `aggregate_check_cost`).
"""
from __future__ import annotations

import dataclasses
import math

from typing import Any

from ginn_jax._src.trusted.transforms import ClipMode, OptimizerConfig, OptimizerSpec


def detection_probability(p: float, k: int) -> float:
  """P(at least one of k malicious steps is verified) = 1 - (1-p)^k."""
  _check_p(p)
  if k < 0:
    raise ValueError(f"k must be >= 0, got {k}")
  return 1.0 - (1.0 - p) ** k


def required_p(target: float, k: int) -> float:
  """Smallest p with detection_probability(p, k) >= target: 1 - (1-target)^(1/k).

  >>> round(required_p(0.999, 688), 4)
  0.01
  """
  if not 0.0 <= target < 1.0:
    raise ValueError(f"target must be in [0, 1), got {target}")
  if k <= 0:
    raise ValueError(f"k must be >= 1, got {k}")
  return _least(lambda p: detection_probability(p, k), 1.0 - (1.0 - target) ** (1.0 / k), target)


def combined_detection_probability(p: float, p_witness: float, k: int) -> float:
  """P(at least one of k malicious steps is re-computed or witness-checked).

  The two coins of a step are independent, so a malicious step escapes both
  with probability (1-p)(1-p_witness), and all k escape with its k-th power:
  1 - ((1-p)(1-p_witness))^k. With ``p_witness == 0`` this is exactly
  `detection_probability(p, k)`.

  >>> round(combined_detection_probability(0.01, 0.05, 100), 4)
  0.9978
  """
  _check_p(p)
  _check_p(p_witness, "p_witness")
  if k < 0:
    raise ValueError(f"k must be >= 0, got {k}")
  return 1.0 - ((1.0 - p) * (1.0 - p_witness)) ** k


def required_p_witness(target: float, k: int, p: float = 0.0) -> float:
  """Smallest p_witness with combined_detection_probability(p, p_witness, k) >= target.

  Solves ((1-p)(1-p_witness))^k = 1-target: p_witness = 1 - (1-target)^(1/k) / (1-p);
  0 when re-computation at rate p alone already reaches the target. With
  ``p == 0`` it equals `required_p(target, k)`.

  >>> round(required_p_witness(0.999, 688), 4)
  0.01
  >>> required_p_witness(0.999, 688, p=0.02)
  0.0
  """
  if not 0.0 <= target < 1.0:
    raise ValueError(f"target must be in [0, 1), got {target}")
  if k <= 0:
    raise ValueError(f"k must be >= 1, got {k}")
  _check_p(p)
  escape = (1.0 - target) ** (1.0 / k)  # Largest per-step escape probability allowed.
  guess = 0.0 if 1.0 - p <= escape else max(0.0, 1.0 - escape / (1.0 - p))
  return _least(lambda pw: combined_detection_probability(p, pw, k), guess, target)


def trusted_cost(p: float, p_witness: float, witness_ratio: float) -> float:
  """Expected trusted check cost per step, in units of one pure-TEE step.

  A re-computation costs one step; a witness check costs 1/witness_ratio of
  one, so the expectation is p + p_witness / witness_ratio.

  Args:
    p: re-computation rate.
    p_witness: witness-check rate.
    witness_ratio: re-computation cost / witness-check cost (> 0; e.g. as
      measured by `ginn bench`).
  """
  _check_p(p)
  _check_p(p_witness, "p_witness")
  if not (isinstance(witness_ratio, (int, float)) and witness_ratio > 0):
    raise ValueError(f"witness_ratio must be > 0, got {witness_ratio!r}")
  return p + p_witness / witness_ratio


def required_k(target: float, p: float) -> int:
  """Smallest k with detection_probability(p, k) >= target."""
  _check_p(p)
  if p == 0.0:
    return math.inf  # type: ignore[return-value]
  if p == 1.0:
    return 1
  k = max(1, math.ceil(math.log(1.0 - target) / math.log(1.0 - p) - 1e-12))
  # The logarithms round: settle k on detection_probability itself, as computed.
  while k > 1 and detection_probability(p, k - 1) >= target:
    k -= 1
  while detection_probability(p, k) < target:
    k += 1
  return k


def ideal_speedup(p: float) -> float:
  """Bound on the speedup over pure TEE as the accelerator gets faster: 1/p."""
  _check_p(p)
  return math.inf if p == 0 else 1.0 / p


@dataclasses.dataclass(frozen=True)
class DeviationBound:
  """How far one unverified malicious step can push the parameters.

  Attributes:
    norm: "linf" (per coordinate) or "l2" (whole vector).
    per_step: bound on the step's immediate deviation from the honest update.
    with_momentum: bound on the total deviation it causes over all later steps.
    bounded: False when the configuration gives no bound (then both are inf).
    note: the reasoning, in words.
  """

  norm: str
  per_step: float
  with_momentum: float
  bounded: bool
  note: str


def deviation_bound(clip: ClipMode, clip_value: float | None,
                    optimizer: OptimizerConfig | OptimizerSpec | str | Any = OptimizerConfig()
                    ) -> DeviationBound:
  """The attacker's per-step parameter deviation for a clip and optimizer.

  Args:
    clip: "elementwise", "global_norm" or "none".
    clip_value: C.
    optimizer: an `OptimizerConfig` (SGD with momentum and weight decay), an
      `OptimizerSpec` (bounded for "sgd" and "momentum", with eta its
      schedule's largest learning rate; no bound for the others), the name of
      another optimizer ("adam", "adamw", ...), or an optax transformation
      (`TrustedRuntime.optimizer`), for which no bound is given.
  """
  if isinstance(optimizer, OptimizerSpec) and optimizer.name in ("sgd", "momentum"):
    eta = optimizer.peak_learning_rate()
    m = optimizer.hyperparameters.get("momentum", 0.0)
    if not math.isfinite(eta):
      return DeviationBound(
          norm="linf", per_step=math.inf, with_momentum=math.inf, bounded=False,
          note=(f"{optimizer}: the learning-rate schedule grows without bound, so the clip bound C "
                "does not bound the parameter deviation; give exponential growth an end_value."))
    schedule = isinstance(optimizer.hyperparameters["learning_rate"], dict)
    rate = f"eta={eta} (the schedule's largest learning rate)" if schedule else f"eta={eta}"
  elif isinstance(optimizer, OptimizerConfig):
    eta, m = optimizer.learning_rate, optimizer.momentum
    rate = f"eta={eta}"
  else:
    what = (f"{optimizer}: normalising and sign-based optimizers (Adam, RMSProp, Lion) rescale the "
            "update by gradient statistics the attacker also controls, so"
            if isinstance(optimizer, (str, OptimizerSpec)) else
            f"an optax transformation ({type(optimizer).__name__}) this module cannot name: nothing "
            "says what it does with the clipped gradient, so")
    return DeviationBound(
        norm="linf", per_step=math.inf, with_momentum=math.inf, bounded=False,
        note=(f"{what} the clip bound C does not bound the parameter deviation; use SGD "
              "(OptimizerConfig, or OptimizerSpec 'sgd' or 'momentum') for a provable bound."),
    )
  if clip == "none":
    return DeviationBound(norm="linf", per_step=math.inf, with_momentum=math.inf, bounded=False,
                          note="no clipping: a single malicious step can move parameters arbitrarily far.")
  per_step = 2.0 * eta * float(clip_value)
  norm = "linf" if clip == "elementwise" else "l2"
  return DeviationBound(
      norm=norm, per_step=per_step, with_momentum=per_step / (1.0 - m), bounded=True,
      note=(f"clip {clip} C={clip_value}: honest and malicious clipped gradients differ by at most "
            f"2C in {norm}; SGD scales that by {rate} (weight decay is computed by the trusted "
            f"side and is identical), momentum m={m} spreads it over later steps by at most "
            f"1/(1-m)={1.0 / (1.0 - m):.3g}."),
  )


def _check_shards(num_shards: int, corrupted_shards: int) -> None:
  if not (isinstance(num_shards, int) and num_shards >= 1):
    raise ValueError(f"num_shards must be a positive int, got {num_shards!r}")
  if not (isinstance(corrupted_shards, int) and 0 <= corrupted_shards <= num_shards):
    raise ValueError(f"corrupted_shards must be an int in [0, num_shards={num_shards}], "
                     f"got {corrupted_shards!r}")


def shard_detection_probability(p: float, k: int, *, num_shards: int, corrupted_shards: int) -> float:
  """P(at least one corrupted shard of k malicious steps is re-computed).

  Each shard's coin comes up independently with probability p, so a step with
  m corrupted shards (each off by more than the tolerance) escapes with
  (1-p)^m and k such steps with (1-p)^(m k): 1 - (1-p)^(m k). One corrupted
  shard (m = 1) gives `detection_probability(p, k)`; all S shards give
  1 - (1-p)^(S k), at the same expected trusted cost p·T per step (each check
  re-computes one shard, T/S).

  >>> round(shard_detection_probability(0.25, 1, num_shards=4, corrupted_shards=4), 4)
  0.6836
  """
  _check_p(p)
  _check_shards(num_shards, corrupted_shards)
  if k < 0:
    raise ValueError(f"k must be >= 0, got {k}")
  return 1.0 - (1.0 - p) ** (corrupted_shards * k)


def shard_deviation_bound(clip: ClipMode, clip_value: float | None,
                          optimizer: OptimizerConfig | OptimizerSpec | str | Any = OptimizerConfig(), *,
                          num_shards: int,
                          corrupted_shards: int) -> DeviationBound:
  """`deviation_bound` for S shards clipped one by one before their mean, with
  m of them corrupted: each corrupted shard's clipped gradient differs from
  the honest one by at most 2C (per coordinate or in L2), and the mean divides
  that by S, so one step moves the parameters by at most 2·eta·C·m/S (times
  1/(1-momentum) over later steps). m = S gives the unsharded bound; no clip
  and normalising optimizers still give none."""
  _check_shards(num_shards, corrupted_shards)
  b = deviation_bound(clip, clip_value, optimizer)
  if not b.bounded:
    return b
  share = corrupted_shards / num_shards
  return DeviationBound(
      norm=b.norm, per_step=b.per_step * share, with_momentum=b.with_momentum * share, bounded=True,
      note=(f"{corrupted_shards} of {num_shards} shards corrupted, each clipped before the mean: the "
            f"mean moves by at most {corrupted_shards}*2C/{num_shards}; " + b.note))


def aggregate_detection_probability(p: float, k: int, *, num_shards: int, lied_shards: int = 1,
                                    p_witness: float = 0.0) -> float:
  """P(an ``"aggregate"`` attack of k malicious steps is caught), per step and over k.

  In ``"aggregate"`` mode (docs/design.md section 11.2) a worker that moved
  the committed mean by delta had to commit it before the secret vectors r
  existed, so ``<r, delta> != 0`` (up to `projection_miss_probability`) and
  the scalars ``v_s = <r, g_s>`` can add up to S ``<r, m>`` only if at least
  one v_s is a lie. The worker chooses which (m = `lied_shards` of them)
  before any coin is drawn, and each shard is re-computed with probability p
  and witness-checked with probability `p_witness`, independently: a step
  escapes with ``((1-p)(1-p_witness))^m``, k steps with its k-th power:
  ``1 - ((1-p)(1-p_witness))^(m k)``. One lied shard (the cheapest lie) gives
  `combined_detection_probability` of one shard's coins: the same rate per
  malicious step as a one-shard attacker in ``"per_shard"`` mode, whose clip,
  however, bounds it S times tighter (`aggregate_deviation_bound`).

  >>> round(aggregate_detection_probability(0.1, 10, num_shards=8), 4)
  0.6513
  """
  _check_p(p)
  _check_p(p_witness, "p_witness")
  _check_shards(num_shards, lied_shards)
  if lied_shards < 1:
    raise ValueError("lied_shards must be >= 1: a changed mean needs a lie about some shard")
  if k < 0:
    raise ValueError(f"k must be >= 0, got {k}")
  return 1.0 - ((1.0 - p) * (1.0 - p_witness)) ** (lied_shards * k)


def aggregate_deviation_bound(clip: ClipMode, clip_value: float | None,
                              optimizer: OptimizerConfig | str = OptimizerConfig()) -> DeviationBound:
  """`deviation_bound` of an ``"aggregate"`` run: the clip applies to the
  mean, so a malicious step moves the parameters by up to 2·eta·C whatever
  the number of shards it corrupted (``"per_shard"``: 2·eta·C·m/S,
  `shard_deviation_bound`)."""
  b = deviation_bound(clip, clip_value, optimizer)
  if not b.bounded:
    return b
  return dataclasses.replace(b, note="aggregate: the clip bounds the shards' mean, so any number of "
                             "corrupted shards moves it by at most 2C; " + b.note)


def projection_miss_probability(x: float) -> float:
  """P(|a^T D b| <= x ||D||_F) for standard Gaussian a, b and a change D of
  rank one: the probability that the sum check of an ``"aggregate"`` step
  does not see a change D of one leaf of the mean whose size is only
  ``1/x`` times the check's tolerance in the projection's units (then the
  worker needs no lie about any shard). For D of rank one, a^T D b =
  ``||D||_F X Y`` with X, Y independent standard normals, and
  ``P(|XY| <= x) = (2/pi) int_0^x K_0(z) dz`` (K_0: the modified Bessel
  function), about ``(2/pi) x (ln(2/x) + 0.42)`` for small x. Changes of
  higher rank spread a^T D b over more products and concentrate less near 0.

  >>> round(projection_miss_probability(1e-3), 5)
  0.00511
  """
  if not x >= 0:
    raise ValueError(f"x must be >= 0, got {x!r}")
  if x == 0:
    return 0.0
  if x >= 20:
    return 1.0
  gamma = 0.5772156649015329
  h, u, term, total = 0.0, x / 2, 1.0, 0.0
  for k in range(120):  # int_0^x K_0 = sum_k 2 u^(2k+1) / (k!^2 (2k+1)) (-ln u + 1/(2k+1) - gamma + H_k)
    if k:
      h += 1.0 / k
      term /= k * k
    total += 2 * u ** (2 * k + 1) * term / (2 * k + 1) * (-math.log(u) + 1 / (2 * k + 1) - gamma + h)
  return min(1.0, max(0.0, 2 / math.pi * total))


def shard_trusted_bytes(param_bytes: int, *, num_shards: int, shard_mode: str,
                        num_leaves: int = 0, vector_elements: int = 0) -> dict[str, int]:
  """Bytes the trusted side handles per step with S shards.

  ``"per_shard"``: it receives, hashes and clips S gradients (``S·P``).
  ``"aggregate"``: it receives, hashes and clips one (``P``), projects it once
  (one more pass over P), sends the vectors (4 bytes per element: sum over
  leaves of rows + columns) and receives ``S·L`` float32 scalars.

  Args:
    param_bytes: P, the bytes of one gradient (the parameters').
    num_shards: S.
    shard_mode: ``"per_shard"`` or ``"aggregate"``.
    num_leaves: L, the gradient's leaves.
    vector_elements: elements of one step's projection vectors.

  Returns:
    ``{"received": ..., "hashed": ..., "sent": ..., "passes_over_gradient": ...}``
    (passes: reads of a gradient's size, hashing and the update counted once).

  >>> shard_trusted_bytes(1000, num_shards=8, shard_mode="aggregate", num_leaves=4, vector_elements=100)
  {'received': 1128, 'hashed': 1128, 'sent': 400, 'passes_over_gradient': 2}
  """
  if shard_mode not in ("per_shard", "aggregate"):
    raise ValueError(f"shard_mode must be 'per_shard' or 'aggregate', got {shard_mode!r}")
  _check_shards(num_shards, 0)
  if shard_mode == "per_shard" or num_shards == 1:
    return {"received": num_shards * param_bytes, "hashed": num_shards * param_bytes, "sent": 0,
            "passes_over_gradient": num_shards}
  scalars = 4 * num_shards * num_leaves
  return {"received": param_bytes + scalars, "hashed": param_bytes + scalars, "sent": 4 * vector_elements,
          "passes_over_gradient": 2}


def aggregate_check_cost(p: float, p_witness: float = 0.0, witness_ratio: float = 1.0, *,
                         num_shards: int) -> float:
  """Expected trusted check cost per step of an ``"aggregate"`` run, in units
  of one pure-TEE step T: S shards, each re-computed with probability p (T/S
  plus its projection) and witness-checked with probability `p_witness`
  (T/(S·witness_ratio)): ``p + p_witness / witness_ratio``, as a run without
  shards at the same rates, on top of the per-step projection pass
  (`shard_trusted_bytes`)."""
  _check_shards(num_shards, 0)
  return trusted_cost(p, p_witness, witness_ratio)  # S shards, each 1/S of a step.


def _least(f, guess: float, target: float) -> float:
  """`guess` (a closed form's value in [0, 1]), or, when the closed form's
  rounding left ``f(guess)`` just below `target`, the smallest float above it
  with ``f >= target``: what `required_p` and `required_p_witness` return
  then meets their target as `f` computes it, on any machine. `f` must be
  non-decreasing with ``f(1.0) >= target``."""
  if f(guess) >= target:
    return guess
  bad, step = guess, math.ulp(guess) if guess > 0 else math.ulp(0.0)
  good = min(1.0, bad + step)
  while f(good) < target:  # Doubling steps up to the first value that reaches it...
    bad, step = good, 2 * step
    good = min(1.0, bad + step)
  while math.nextafter(bad, math.inf) < good:  # ...then bisection down to the smallest.
    mid = bad + (good - bad) / 2
    if mid <= bad or mid >= good:
      break
    if f(mid) >= target:
      good = mid
    else:
      bad = mid
  return good


def _check_p(p: float, name: str = "p") -> None:
  if not 0.0 <= p <= 1.0:
    raise ValueError(f"{name} must be in [0, 1], got {p}")
