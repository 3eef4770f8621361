"""What verification at rate p and a clip C guarantee (docs/design.md sections 1, 4, 8).

Detection: a backdoor that needs k malicious steps, each verified
independently with probability p, escapes with probability (1-p)^k.

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


def _check_p(p: float) -> None:
  if not 0.0 <= p <= 1.0:
    raise ValueError(f"p must be in [0, 1], got {p}")
