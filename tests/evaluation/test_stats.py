"""Tests for vps.evaluation.stats against closed forms, scipy and published values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binomtest

from vps.evaluation.stats import compare_paired, mcnemar_exact, paired_bootstrap_diff, wilson_interval

Z95 = 1.959963984540054  # standard normal 0.975 quantile


def wilson_closed_form(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson (1927) bounds written as the roots of the score-test quadratic."""
    p = k / n
    a = 1 + z * z / n
    b = -(2 * p + z * z / n)
    c = p * p
    disc = math.sqrt(max(b * b - 4 * a * c, 0.0))
    return ((-b - disc) / (2 * a), (-b + disc) / (2 * a))


@pytest.mark.parametrize("k,n", [(8, 10), (0, 10), (10, 10), (1, 3), (500, 1319), (37, 40)])
def test_wilson_matches_closed_form(k: int, n: int) -> None:
    low, high = wilson_interval(k, n)
    ref_low, ref_high = wilson_closed_form(k, n)
    assert low == pytest.approx(ref_low, abs=1e-12)
    assert high == pytest.approx(ref_high, abs=1e-12)
    assert 0.0 <= low <= k / n <= high <= 1.0


def test_wilson_published_values() -> None:
    # Commonly published four-decimal values for the 95% Wilson interval.
    low, high = wilson_interval(8, 10)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)
    # 0/10 -> (0, 0.2775) and 10/10 -> (0.7225, 1).
    assert wilson_interval(0, 10)[0] == 0.0
    assert round(wilson_interval(0, 10)[1], 4) == 0.2775
    assert round(wilson_interval(10, 10)[0], 4) == 0.7225
    assert wilson_interval(10, 10)[1] == 1.0


def test_wilson_other_confidence_and_edge_cases() -> None:
    z99 = 2.5758293035489004
    low, high = wilson_interval(8, 10, confidence=0.99)
    ref = wilson_closed_form(8, 10, z99)
    assert (low, high) == pytest.approx(ref, abs=1e-12)
    assert low < wilson_interval(8, 10)[0]
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(11, 10)
    with pytest.raises(ValueError, match="n must"):
        wilson_interval(1, -1)
    with pytest.raises(ValueError, match="confidence"):
        wilson_interval(1, 2, confidence=1.0)


def test_mcnemar_hand_value() -> None:
    # 2 * (C(10,0) + C(10,1)) / 2^10 = 22 / 1024
    assert mcnemar_exact(1, 9) == pytest.approx(0.021484375, rel=1e-12)
    assert mcnemar_exact(9, 1) == pytest.approx(0.021484375, rel=1e-12)


@pytest.mark.parametrize("b,c", [(0, 1), (0, 5), (3, 3), (4, 7), (12, 30), (60, 41), (0, 25), (200, 170)])
def test_mcnemar_matches_scipy_binomtest(b: int, c: int) -> None:
    expected = binomtest(b, b + c, 0.5, alternative="two-sided").pvalue
    assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_mcnemar_degenerate_and_invalid() -> None:
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 5) == 1.0
    with pytest.raises(ValueError, match="b must"):
        mcnemar_exact(-1, 3)
    with pytest.raises(ValueError, match="c must"):
        mcnemar_exact(1, 2.5)


def test_bootstrap_is_deterministic_and_covers_observed_mean() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=200)
    y = x + 0.3 + rng.normal(scale=0.5, size=200)
    first = paired_bootstrap_diff(x, y, n_boot=2000, seed=7)
    assert first == paired_bootstrap_diff(x, y, n_boot=2000, seed=7)
    assert first != paired_bootstrap_diff(x, y, n_boot=2000, seed=8)
    mean, low, high = first
    assert mean == pytest.approx(float(np.mean(y - x)))
    assert low < mean < high
    # The percentile interval should be close to the normal-theory one.
    se = float(np.std(y - x, ddof=1) / math.sqrt(200))
    assert high - low == pytest.approx(2 * Z95 * se, rel=0.15)


def test_bootstrap_constant_difference_and_errors() -> None:
    assert paired_bootstrap_diff([1.0, 2.0, 3.0], [2.0, 3.0, 4.0], n_boot=50) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="same length"):
        paired_bootstrap_diff([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="empty"):
        paired_bootstrap_diff([], [])
    with pytest.raises(ValueError, match="y contains a non-finite"):
        paired_bootstrap_diff([1.0, 2.0], [1.0, float("inf")])
    with pytest.raises(ValueError, match="n_boot"):
        paired_bootstrap_diff([1.0], [1.0], n_boot=0)


def test_compare_paired_fields() -> None:
    #               b=2 (right->wrong)  c=5 (wrong->right)  3 both right, 2 both wrong
    base = [True, True, False, False, False, False, False, True, True, True, False, False]
    method = [False, False, True, True, True, True, True, True, True, True, False, False]
    base_nll = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0]
    method_nll = [v - 0.5 for v in base_nll]
    out = compare_paired(
        base,
        method,
        base_nll=base_nll,
        method_nll=method_nll,
        base_seconds=[1.0] * 12,
        method_seconds=[2.5] * 12,
    )
    assert out["n"] == 12
    assert out["base_accuracy"] == pytest.approx(5 / 12)
    assert out["method_accuracy"] == pytest.approx(8 / 12)
    assert out["base_accuracy_ci"] == wilson_interval(5, 12)
    assert out["method_accuracy_ci"] == wilson_interval(8, 12)
    assert out["accuracy_diff"] == pytest.approx(3 / 12)
    low, high = out["accuracy_diff_ci"]
    assert low <= 3 / 12 <= high
    assert out["flips_to_correct"] == 5 and out["flips_to_wrong"] == 2
    assert out["mcnemar_p"] == pytest.approx(binomtest(2, 7, 0.5).pvalue)
    assert out["nll_diff"] == pytest.approx(-0.5)
    assert out["nll_diff_ci"] == pytest.approx((-0.5, -0.5))
    assert out["base_seconds_mean"] == 1.0 and out["method_seconds_mean"] == 2.5
    assert out["cost_ratio"] == pytest.approx(2.5)
    assert out == compare_paired(base, method, base_nll, method_nll, [1.0] * 12, [2.5] * 12), (
        "same seed must give identical results"
    )


def test_compare_paired_optional_fields_absent() -> None:
    out = compare_paired([1, 0, 1], [1, 1, 1])
    assert out["nll_diff"] is None and out["nll_diff_ci"] is None
    assert out["cost_ratio"] is None and out["base_seconds_mean"] is None
    assert out["flips_to_correct"] == 1 and out["flips_to_wrong"] == 0


def test_compare_paired_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="method_correct has 2 items"):
        compare_paired([True, False, True], [True, False])
    with pytest.raises(ValueError, match="method_nll has 2 items"):
        compare_paired([True] * 3, [True] * 3, base_nll=[1.0] * 3, method_nll=[1.0] * 2)
    with pytest.raises(ValueError, match="base_seconds was given without method_seconds"):
        compare_paired([True] * 3, [True] * 3, base_seconds=[1.0] * 3)
    with pytest.raises(ValueError, match="base_correct must contain only booleans"):
        compare_paired([0.5, 1, 0], [1, 1, 0])
    with pytest.raises(ValueError, match="empty"):
        compare_paired([], [])
    with pytest.raises(ValueError, match="undefined"):
        compare_paired([True], [True], base_seconds=[0.0], method_seconds=[1.0])
