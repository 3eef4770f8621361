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
