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
  way; this module refuses to state a bound for them.
"""
from __future__ import annotations

import dataclasses
import math

from ginn_jax._src.trusted.transforms import ClipMode, OptimizerConfig


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
  return 1.0 - (1.0 - target) ** (1.0 / k)


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
  if 1.0 - p <= escape:
    return 0.0
  return max(0.0, 1.0 - escape / (1.0 - p))


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
  return max(1, math.ceil(math.log(1.0 - target) / math.log(1.0 - p) - 1e-12))


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
                    optimizer: OptimizerConfig | str = OptimizerConfig()) -> DeviationBound:
  """The attacker's per-step parameter deviation for a clip and optimizer.

  Args:
    clip: "elementwise", "global_norm" or "none".
    clip_value: C.
    optimizer: an `OptimizerConfig` (SGD with momentum and weight decay) or the
      name of another optimizer ("adam", "adamw", ...), for which no bound is given.
  """
  if not isinstance(optimizer, OptimizerConfig):
    return DeviationBound(
        norm="linf", per_step=math.inf, with_momentum=math.inf, bounded=False,
        note=(f"{optimizer}: normalising optimizers divide the update by a running "
              "gradient scale the attacker also controls, so the clip bound C does not "
              "bound the parameter deviation; use SGD for a provable bound."),
    )
  if clip == "none":
    return DeviationBound(norm="linf", per_step=math.inf, with_momentum=math.inf, bounded=False,
                          note="no clipping: a single malicious step can move parameters arbitrarily far.")
  eta, m = optimizer.learning_rate, optimizer.momentum
  per_step = 2.0 * eta * float(clip_value)
  norm = "linf" if clip == "elementwise" else "l2"
  return DeviationBound(
      norm=norm, per_step=per_step, with_momentum=per_step / (1.0 - m), bounded=True,
      note=(f"clip {clip} C={clip_value}: honest and malicious clipped gradients differ by at most "
            f"2C in {norm}; SGD scales that by eta={eta} (weight decay is computed by the trusted "
            f"side and is identical), momentum m={m} spreads it over later steps by at most "
            f"1/(1-m)={1.0 / (1.0 - m):.3g}."),
  )


def _check_p(p: float, name: str = "p") -> None:
  if not 0.0 <= p <= 1.0:
    raise ValueError(f"{name} must be in [0, 1], got {p}")
