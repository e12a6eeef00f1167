import math

import numpy as np
import pytest

from agpo_lab.experiments.stats import (
    mean_ci95,
    ratio_ci95,
    t_critical_95,
    zero_variance_probability,
)


def test_mean_ci95_hand_computed():
    mean, half = mean_ci95([0.5, 0.6, 0.7])
    assert mean == pytest.approx(0.6)
    assert half == pytest.approx(4.303 * 0.1 / math.sqrt(3))


def test_mean_ci95_single_value_has_unknown_width_and_ignores_nan():
    mean, half = mean_ci95([0.4, float("nan")])
    assert mean == 0.4 and math.isnan(half)
    with pytest.raises(ValueError, match="no finite values"):
        mean_ci95([float("nan")])


def test_t_critical_values():
    assert t_critical_95(1) == 12.706 and t_critical_95(2) == 4.303 and t_critical_95(100) == 1.96
    with pytest.raises(ValueError):
        t_critical_95(0)


def test_ratio_ci95_delta_method():
    ratio, half = ratio_ci95([60, 62, 64], [40, 42, 44])
    assert ratio == pytest.approx(62 / 42)
    se = ratio * math.sqrt((2 / math.sqrt(3) / 62) ** 2 + (2 / math.sqrt(3) / 42) ** 2)
    assert half == pytest.approx(4.303 * se)
    assert math.isnan(ratio_ci95([60], [40])[1])
    with pytest.raises(ValueError, match="denominator"):
        ratio_ci95([1, 2], [0, 0])


def test_zero_variance_probability_formula():
    assert zero_variance_probability(0.5, 8) == pytest.approx(2 * 0.5**8)
    assert zero_variance_probability(0.9, 8) == pytest.approx(0.9**8 + 0.1**8)
    assert zero_variance_probability(np.array([0.0, 1.0]), 4).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError):
        zero_variance_probability(1.5, 4)
