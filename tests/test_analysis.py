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
