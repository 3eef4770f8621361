"""The analysis module against docs/design.md section 8's reference numbers."""
import math

import pytest

import ginn_jax as ginn

A = ginn.analysis


@pytest.mark.parametrize("k,p", [(100, 0.067), (688, 0.01), (1000, 0.0069)])
def test_required_p_matches_design_table(k, p):
  assert A.required_p(0.999, k) == pytest.approx(p, abs=5e-4)
  assert A.detection_probability(A.required_p(0.999, k), k) == pytest.approx(0.999)


@pytest.mark.parametrize("p,k,expected", [(0.0, 10, 0.0), (1.0, 1, 1.0), (0.5, 2, 0.75), (0.1, 0, 0.0)])
def test_detection_probability(p, k, expected):
  assert A.detection_probability(p, k) == pytest.approx(expected)


def test_required_k_is_the_smallest_sufficient_k():
  for p in (0.5, 0.1, 0.01):
    k = A.required_k(0.999, p)
    assert A.detection_probability(p, k) >= 0.999 > A.detection_probability(p, k - 1)
  assert A.required_k(0.999, 0.0) == math.inf


def test_deviation_bounds():
  sgd = ginn.OptimizerConfig(learning_rate=0.1, momentum=0.9)
  b = A.deviation_bound("elementwise", 0.005, sgd)
  assert b.bounded and b.norm == "linf"
  assert b.per_step == pytest.approx(2 * 0.1 * 0.005)
  assert b.with_momentum == pytest.approx(b.per_step / (1 - 0.9))
  assert A.deviation_bound("global_norm", 1.0, sgd).norm == "l2"
  assert not A.deviation_bound("none", None, sgd).bounded
  adam = A.deviation_bound("elementwise", 0.005, "adam")
  assert not adam.bounded and "does not" in adam.note


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_bad_probability_is_refused(bad):
  with pytest.raises(ValueError):
    A.detection_probability(bad, 3)
  with pytest.raises(ValueError):
    ginn.ProtocolConfig(p=bad)


# -- witness checks (Freivalds): a second, independent coin per step -----------------


@pytest.mark.parametrize("p,k", [(0.0, 10), (0.01, 688), (0.5, 2), (1.0, 3), (0.1, 0)])
def test_combined_probability_without_witness_is_the_old_formula(p, k):
  assert A.combined_detection_probability(p, 0.0, k) == A.detection_probability(p, k)


@pytest.mark.parametrize("p,pw,k,expected", [
    (0.5, 0.5, 1, 0.75), (0.5, 0.5, 2, 1 - 0.25**2), (0.0, 0.3, 2, 1 - 0.7**2),
    (0.1, 0.2, 0, 0.0), (0.0, 1.0, 1, 1.0), (1.0, 0.0, 5, 1.0),
])
def test_combined_detection_probability(p, pw, k, expected):
  assert A.combined_detection_probability(p, pw, k) == pytest.approx(expected)
  # The two coins are symmetric.
  assert A.combined_detection_probability(pw, p, k) == pytest.approx(expected)


@pytest.mark.parametrize("target,k,p", [(0.999, 688, 0.0), (0.999, 688, 0.005), (0.99, 100, 0.02),
                                        (0.5, 1, 0.1), (0.999, 1000, 0.0069 / 2)])
def test_required_p_witness_round_trips(target, k, p):
  pw = A.required_p_witness(target, k, p)
  assert 0.0 < pw <= 1.0
  assert A.combined_detection_probability(p, pw, k) == pytest.approx(target, abs=1e-9)
  # It is the smallest: a little less misses the target.
  assert A.combined_detection_probability(p, pw * (1 - 1e-6), k) < target


def test_required_p_witness_without_p_is_required_p():
  for k in (1, 100, 688, 1000):
    assert A.required_p_witness(0.999, k) == pytest.approx(A.required_p(0.999, k), rel=1e-12)
    assert A.required_p_witness(0.999, k, p=0.0) == pytest.approx(A.required_p(0.999, k), rel=1e-12)


def test_required_p_witness_is_zero_when_p_suffices():
  p = A.required_p(0.999, 688)
  assert A.required_p_witness(0.999, 688, p=min(1.0, p * 1.01)) == 0.0
  assert A.required_p_witness(0.999, 688, p=1.0) == 0.0
  assert A.required_p_witness(0.0, 5, p=0.0) == 0.0


def test_trusted_cost():
  assert A.trusted_cost(0.1, 0.0, 20.0) == pytest.approx(0.1)
  assert A.trusted_cost(0.01, 0.5, 25.0) == pytest.approx(0.01 + 0.02)
  assert A.trusted_cost(0.0, 1.0, 1.0) == pytest.approx(1.0)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_bad_witness_probability_is_refused(bad):
  with pytest.raises(ValueError, match="p_witness"):
    A.combined_detection_probability(0.1, bad, 3)
  with pytest.raises(ValueError, match="p must"):
    A.combined_detection_probability(bad, 0.1, 3)
  with pytest.raises(ValueError):
    A.required_p_witness(0.999, 10, p=bad)
  with pytest.raises(ValueError):
    A.trusted_cost(0.1, bad, 10.0)


def test_bad_witness_arguments_are_refused():
  with pytest.raises(ValueError, match="k"):
    A.combined_detection_probability(0.1, 0.1, -1)
  for target in (-0.1, 1.0, 1.5):
    with pytest.raises(ValueError, match="target"):
      A.required_p_witness(target, 10)
  with pytest.raises(ValueError, match="k"):
    A.required_p_witness(0.999, 0)
  for ratio in (0.0, -2.0):
    with pytest.raises(ValueError, match="witness_ratio"):
      A.trusted_cost(0.1, 0.1, ratio)


def test_calibration_measures_the_witness_tolerance_too(mlp, small_data):
  """A layered model: every calibration step is also witness-checked (honest worker)."""
  assert mlp.layered
  cal = ginn.calibrate_tolerance(mlp, *small_data, ginn.ProtocolConfig(batch_size=32), num_steps=2)
  floor = ginn.DEFAULT_WITNESS_FLOOR
  assert cal.witness_tolerance is not None
  assert cal.witness_tolerance.rel_l2 >= floor.rel_l2 and cal.witness_tolerance.max_abs >= floor.max_abs
  assert 0.0 <= cal.witness_max_rel_l2 < 1e-4 and 0.0 <= cal.witness_max_abs < 1e-4
  assert cal.witness_tolerance.rel_l2 == max(floor.rel_l2, cal.safety_factor * cal.witness_max_rel_l2)
  assert cal.max_rel_l2 == 0.0 and cal.tolerance == ginn.Tolerance(1e-5, 1e-5)  # Unchanged behaviour.


# -- exact at the ends, on any machine's rounding --------------------------------------------


def _wilson_reference(k, n, z=2.576):
  """The Wilson bounds in 50-digit decimal arithmetic (no float rounding to speak of)."""
  from decimal import Decimal, getcontext
  getcontext().prec = 50
  k, n, z = Decimal(k), Decimal(n), Decimal(str(z))
  phat = k / n
  denom = 1 + z * z / n
  centre = (phat + z * z / (2 * n)) / denom
  half = z * (phat * (1 - phat) / n + z * z / (4 * n * n)).sqrt() / denom
  return float(centre - half), float(centre + half)


@pytest.mark.parametrize("n", range(1, 51))
def test_wilson_interval_contains_its_rate_and_is_exact_at_its_ends(n):
  """For every count 0..n: 0.0 exactly at 0 of n (the formula's rounding gave
  5.6e-17 for 0 of 5, above its rate 0), 1.0 exactly at n of n, the rate
  (as the detection rows compute it) inside, the textbook bounds elsewhere."""
  from ginn_jax._src.lab.common import wilson_interval
  for k in range(n + 1):
    lo, hi = wilson_interval(k, n)
    rate = k / n
    assert 0.0 <= lo <= rate <= hi <= 1.0, (k, n, lo, rate, hi)
    assert (lo == 0.0) == (k == 0) and (hi == 1.0) == (k == n), (k, n, lo, hi)
    ref_lo, ref_hi = _wilson_reference(k, n)
    assert lo == pytest.approx(max(ref_lo, 0.0), rel=1e-12, abs=1e-15)
    assert hi == pytest.approx(min(ref_hi, 1.0), rel=1e-12, abs=1e-15)


def test_wilson_interval_refuses_impossible_counts():
  from ginn_jax._src.lab.common import wilson_interval
  assert wilson_interval(0, 0) == (0.0, 1.0)
  for k, n in [(-1, 5), (6, 5), (0, -1)]:
    with pytest.raises(ValueError, match="successes"):
      wilson_interval(k, n)


@pytest.mark.parametrize("trials", [1, 2, 5, 7, 10, 50, 200])
def test_every_detection_row_holds_its_rate_inside_its_interval(trials):
  """Experiment 3's rows, for every count of detected runs from 0 to `trials`:
  the rate inside its 99% interval, so the plot's error bars are >= 0."""
  from ginn_jax._src.lab.common import error_bars
  from ginn_jax._src.lab.detection import detection_row
  rows = [detection_row(0.1, 3, trials=trials, detected=d, steps=[0] * d) for d in range(trials + 1)]
  for d, row in enumerate(rows):
    lo, hi = row["ci99"]
    assert row["rate"] == d / trials and lo <= row["rate"] <= hi, row
    assert (lo == 0.0) == (d == 0) and (hi == 1.0) == (d == trials), row
    assert row["expected"] == pytest.approx(1 - 0.9**3)
    assert row["expected_inside_ci"] == (lo <= row["expected"] <= hi)
    assert row["mean_detection_step"] == (0.0 if d else None)
  below, above = error_bars([r["rate"] for r in rows], [r["ci99"] for r in rows])
  assert min(below) >= 0.0 and min(above) >= 0.0
  assert below[0] == 0.0 and above[-1] == 0.0


def test_error_bars_refuse_a_point_outside_its_interval():
  from ginn_jax._src.lab.common import error_bars
  assert error_bars([0.5, 0.0], [(0.25, 1.0), (0.0, 0.5)]) == [[0.25, 0.0], [0.5, 0.5]]
  with pytest.raises(ValueError, match="point 1: 0.0 lies outside"):
    error_bars([0.5, 0.0], [(0.25, 1.0), (5.55e-17, 0.5)])


TARGETS = [0.0, 1e-9, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 0.999, 0.9999]


@pytest.mark.parametrize("target", TARGETS)
def test_required_rates_meet_their_target_as_computed(target):
  """The closed forms round (required_p(0.1, 1) was 0.09999999999999998, which
  detects with probability below 0.1): each answer meets its target through
  the very function it inverts, and the next float down does not."""
  for k in [*range(1, 60), 100, 688, 1000, 10**5]:
    p = A.required_p(target, k)
    assert 0.0 <= p <= 1.0 and A.detection_probability(p, k) >= target, (target, k, p)
    # The closed form's own value, or the smallest float that meets the target.
    assert p == 1 - (1 - target) ** (1 / k) or A.detection_probability(math.nextafter(p, 0.0), k) < target
    for p0 in (0.0, 0.001, 0.3):
      pw = A.required_p_witness(target, k, p=p0)
      assert 0.0 <= pw <= 1.0 and A.combined_detection_probability(p0, pw, k) >= target, (target, k, p0)
  if target > 0:
    for p in (0.5, 1 / 3, 0.25, 0.1, 0.05, 0.01):
      k = A.required_k(target, p)
      assert A.detection_probability(p, k) >= target and (k == 1 or A.detection_probability(p, k - 1) < target)


def test_coins_are_exact_at_p_0_and_1(monkeypatch):
  """p = 1 draws every step and p = 0 none, whatever the digest: even where the
  PRF's first 8 bytes are all ones, whose float quotient by 2^64 rounds to 1.0."""
  import hmac as hmac_mod

  from ginn_jax._src.trusted import keys

  k = keys.audit_keys(b"s" * 32)

  class Fixed:
    def __init__(self, out):
      self.out = out

    def digest(self):
      return self.out

  for prf, p, want in [(b"\xff" * 32, 1.0, True), (b"\xff" * 32, 0.0, False),
                       (b"\x00" * 32, 0.0, False), (b"\x00" * 32, 1e-300, True),
                       (b"\x80" + bytes(31), 0.5, False), (b"\x7f" + b"\xff" * 31, 0.5, True)]:
    monkeypatch.setattr(hmac_mod, "new", lambda *a, out=prf, **kw: Fixed(out))
    for coins in (keys.shard_verification_coins, keys.shard_witness_coins):
      assert coins(k, 3, bytes(32), p, 1) == (want,) and coins(k, 3, bytes(32), p, 4) == (want,) * 4
  monkeypatch.undo()
  assert all(keys.verification_coin(k, t, bytes([t]) * 32, 1.0) for t in range(256))
  assert not any(keys.verification_coin(k, t, bytes([t]) * 32, 0.0) for t in range(256))


def test_interpolated_threshold_stays_inside_its_bracket():
  """10 ** log10(t) rounds: at ASR exactly at the level the crossing is t* itself."""
  from ginn_jax._src.lab.stealth_threshold import find_threshold
  for lo, hi in [(0.01, 0.02), (1e-3, 3e-2), (0.02, 0.05), (1e-5, 1e-1)]:
    for a_lo, a_hi in [(0.2, 0.5), (0.0, 1.0), (0.49, 0.5), (0.499999, 0.9)]:
      th = find_threshold([(lo, a_lo), (hi, a_hi)])
      assert lo <= th["t_interp"] <= hi and th["bracket"] == [lo, hi], th
    assert find_threshold([(lo, 0.2), (hi, 0.5)])["t_interp"] == hi
