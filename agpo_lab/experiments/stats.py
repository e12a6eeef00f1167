"""Small statistics: means and ratios with 95% confidence intervals over seeds, and how likely a
group of G completions is to carry no GRPO gradient."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# Two-sided 95% Student-t critical values t_{0.975, df} for df = 1..30 (standard tables).
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t_critical_95(df: int) -> float:
    """Two-sided 95% critical value of Student's t with `df` degrees of freedom.

    Example: ``t_critical_95(2) == 4.303`` (3 seeds); beyond df = 30 the normal value 1.96 is used.
    """
    if df < 1:
        raise ValueError(f"t_critical_95: degrees of freedom must be >= 1, got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of its 95% t-interval: mean +/- t_{0.975,n-1} * s / sqrt(n).

    s is the Bessel-corrected standard deviation. With one value the half-width is NaN (unknown).
    Example: ``mean_ci95([0.5, 0.6, 0.7])`` gives ``(0.6, 4.303 * 0.1 / sqrt(3)) = (0.6, 0.2484)``.
    """
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not finite:
        raise ValueError("mean_ci95: no finite values to summarise")
    n = len(finite)
    mean = sum(finite) / n
    if n == 1:
        return mean, float("nan")
    std = math.sqrt(sum((v - mean) ** 2 for v in finite) / (n - 1))
    return mean, t_critical_95(n - 1) * std / math.sqrt(n)


def ratio_ci95(numerators: Sequence[float], denominators: Sequence[float]) -> tuple[float, float]:
    """Ratio of means with a 95% interval by the delta method (independent samples).

    For mean a of the numerators and b of the denominators, r = a / b and
    se(r)^2 ~= r^2 * (se_a^2 / a^2 + se_b^2 / b^2), and the half-width is t_{0.975, min(n)-1} * se(r)
    (conservative for small seed counts). Example: [60, 62, 64] over [40, 42, 44] gives 62 / 42 = 1.476.
    """
    a, half_a = mean_ci95(numerators)
    b, half_b = mean_ci95(denominators)
    if b == 0:
        raise ValueError("ratio_ci95: the denominator's mean is zero; the ratio is undefined")
    ratio = a / b
    if math.isnan(half_a) or math.isnan(half_b) or a == 0:
        return ratio, float("nan")
    se_a = half_a / t_critical_95(len(numerators) - 1)
    se_b = half_b / t_critical_95(len(denominators) - 1)
    se = abs(ratio) * math.sqrt((se_a / a) ** 2 + (se_b / b) ** 2)
    return ratio, t_critical_95(min(len(numerators), len(denominators)) - 1) * se


def zero_variance_probability(p: np.ndarray | float, group_size: int) -> np.ndarray:
    """P(a group of G completions has zero reward variance) = p^G + (1-p)^G for 0/1 rewards.

    Example: p = 0.5, G = 8 gives 2 * 0.5^8 = 0.0078; p = 0.9, G = 8 gives 0.430.
    """
    if group_size < 1:
        raise ValueError(f"zero_variance_probability: group_size must be >= 1, got {group_size}")
    p = np.asarray(p, dtype=float)
    if np.any((p < 0) | (p > 1)):
        raise ValueError("zero_variance_probability: p must lie in [0, 1]")
    return p**group_size + (1 - p) ** group_size
