"""Paired statistics for comparing a method against a baseline on the same items.

Every item is scored by both systems, so comparisons use paired tests
(McNemar, paired bootstrap) rather than treating the two accuracies as
independent samples, which would overstate the uncertainty of the difference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist
from typing import Any

import numpy as np
from scipy.stats import binom

__all__ = ["compare_paired", "mcnemar_exact", "paired_bootstrap_diff", "wilson_interval"]

# Bootstrap resamples are drawn in blocks of rows so memory stays bounded
# (n_boot x n indices at once would be ~100 MB for 10k resamples of GSM8K).
# The block size is fixed so that a seed always maps to the same resamples.
_BOOT_BLOCK_ELEMENTS = 1 << 21


def _check_confidence(confidence: float) -> float:
    confidence = float(confidence)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be strictly between 0 and 1, got {confidence!r}")
    return confidence


def _check_count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``successes / n``.

    With ``n == 0`` there is no information and ``(0.0, 1.0)`` is returned
    rather than raising, so empty subsets can be tabulated uniformly.

    Raises:
        ValueError: If counts are negative or non-integer, ``successes > n``,
            or ``confidence`` is not in (0, 1).
    """
    successes = _check_count("successes", successes)
    n = _check_count("n", n)
    confidence = _check_confidence(confidence)
    if successes > n:
        raise ValueError(f"successes ({successes}) must not exceed n ({n})")
    if n == 0:
        return (0.0, 1.0)
    z = NormalDist().inv_cdf(0.5 + confidence / 2.0)
    z2 = z * z
    p = successes / n
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2.0 * n)) / denom
    half = z / denom * math.sqrt(p * (1.0 - p) / n + z2 / (4.0 * n * n))
    # At 0 or n successes the outer bound is exactly 0 or 1 analytically, but
    # centre - half leaves rounding residue (~1e-17) that would misreport it.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return (low, high)


def mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value from the discordant pair counts.

    Args:
        b: Items the baseline got right and the method got wrong.
        c: Items the baseline got wrong and the method got right.

    Under the null hypothesis each discordant item is equally likely to fall
    either way, so this is the two-sided binomial test of ``min(b, c)`` in
    ``b + c`` trials with ``p = 0.5``: twice the smaller tail, capped at 1.
    Returns 1.0 when there are no discordant pairs.
    """
    b = _check_count("b", b)
    c = _check_count("c", c)
    n = b + c
    if n == 0:
        return 1.0
    return float(min(1.0, 2.0 * binom.cdf(min(b, c), n, 0.5)))


def _as_float_array(name: str, values: Sequence[float] | np.ndarray) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a sequence of numbers: {exc}") from exc
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        bad = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise ValueError(f"{name} contains a non-finite value at position {bad}: {arr[bad]!r}")
    return arr


def _as_bool_array(name: str, values: Sequence[bool] | np.ndarray) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    # np.asarray(..., dtype=bool) would turn 0.5 or "no" into True; only
    # accept values that really are booleans or 0/1.
    if arr.dtype != np.bool_:
        if arr.size and not np.isin(arr, (0, 1)).all():
            raise ValueError(f"{name} must contain only booleans or 0/1")
        arr = arr.astype(bool)
    return arr


def _check_lengths(expected: int, **arrays: np.ndarray) -> None:
    for name, arr in arrays.items():
        if arr.shape[0] != expected:
            raise ValueError(f"{name} has {arr.shape[0]} items but base_correct has {expected}")


def paired_bootstrap_diff(
    x: Sequence[float] | np.ndarray,
    y: Sequence[float] | np.ndarray,
    n_boot: int = 10000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Mean of ``y - x`` over paired items with a percentile bootstrap interval.

    Items (pairs) are resampled with replacement, keeping each ``x[i]`` with
    its ``y[i]``.  The result is deterministic for a given ``seed``.

    Returns:
        ``(mean_diff, low, high)``.

    Raises:
        ValueError: On empty or unequal-length inputs, non-finite values,
            ``n_boot < 1`` or ``confidence`` outside (0, 1).
    """
    xa = _as_float_array("x", x)
    ya = _as_float_array("y", y)
    if xa.shape != ya.shape:
        raise ValueError(f"x and y must have the same length, got {xa.shape[0]} and {ya.shape[0]}")
    n = xa.shape[0]
    if n == 0:
        raise ValueError("x and y are empty; need at least one paired item")
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}")
    confidence = _check_confidence(confidence)

    diff = ya - xa
    rng = np.random.default_rng(seed)
    means = np.empty(int(n_boot), dtype=np.float64)
    rows_per_block = max(1, _BOOT_BLOCK_ELEMENTS // n)
    for start in range(0, int(n_boot), rows_per_block):
        stop = min(int(n_boot), start + rows_per_block)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = diff[idx].mean(axis=1)
    alpha = 1.0 - confidence
    low, high = np.quantile(means, [alpha / 2.0, 1.0 - alpha / 2.0])
    return (float(diff.mean()), float(low), float(high))


def compare_paired(
    base_correct: Sequence[bool] | np.ndarray,
    method_correct: Sequence[bool] | np.ndarray,
    base_nll: Sequence[float] | np.ndarray | None = None,
    method_nll: Sequence[float] | np.ndarray | None = None,
    base_seconds: Sequence[float] | np.ndarray | None = None,
    method_seconds: Sequence[float] | np.ndarray | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Summarise a method against a baseline scored on the same items.

    All intervals are 95%.  Returned keys:

    - ``n``: number of items.
    - ``base_accuracy``, ``base_accuracy_ci``: accuracy and Wilson interval.
    - ``method_accuracy``, ``method_accuracy_ci``: likewise for the method.
    - ``accuracy_diff``, ``accuracy_diff_ci``: method minus base, with a
      paired bootstrap interval.
    - ``flips_to_correct``: base wrong, method right.
    - ``flips_to_wrong``: base right, method wrong.
    - ``mcnemar_p``: exact McNemar p-value from the two flip counts.
    - ``nll_diff``, ``nll_diff_ci``: mean of ``method_nll - base_nll`` with a
      paired bootstrap interval, or ``None`` when NLLs were not given.
    - ``base_seconds_mean``, ``method_seconds_mean``, ``cost_ratio``: mean
      seconds per item and method/base ratio, or ``None`` when not given.

    Keys are always present (``None`` when not applicable) so rows from
    different runs can be tabulated without checking for missing columns.

    Raises:
        ValueError: If an argument's length differs from ``base_correct``, if
            only one of a base/method pair is given, on empty inputs, on
            non-finite NLLs or seconds, on negative seconds, or when the mean
            base time is zero (the cost ratio would be undefined).
    """
    base = _as_bool_array("base_correct", base_correct)
    method = _as_bool_array("method_correct", method_correct)
    n = base.shape[0]
    if n == 0:
        raise ValueError("base_correct is empty; need at least one item")
    _check_lengths(n, method_correct=method)

    flips_to_correct = int(np.count_nonzero(~base & method))
    flips_to_wrong = int(np.count_nonzero(base & ~method))
    base_hits = int(np.count_nonzero(base))
    method_hits = int(np.count_nonzero(method))
    acc_diff, acc_low, acc_high = paired_bootstrap_diff(
        base.astype(np.float64), method.astype(np.float64), seed=seed
    )
    result: dict[str, Any] = {
        "n": n,
        "base_accuracy": base_hits / n,
        "base_accuracy_ci": wilson_interval(base_hits, n),
        "method_accuracy": method_hits / n,
        "method_accuracy_ci": wilson_interval(method_hits, n),
        "accuracy_diff": acc_diff,
        "accuracy_diff_ci": (acc_low, acc_high),
        "flips_to_correct": flips_to_correct,
        "flips_to_wrong": flips_to_wrong,
        "mcnemar_p": mcnemar_exact(flips_to_wrong, flips_to_correct),
        "nll_diff": None,
        "nll_diff_ci": None,
        "base_seconds_mean": None,
        "method_seconds_mean": None,
        "cost_ratio": None,
    }

    nll = _optional_pair("base_nll", base_nll, "method_nll", method_nll, n)
    if nll is not None:
        nll_diff, nll_low, nll_high = paired_bootstrap_diff(nll[0], nll[1], seed=seed)
        result["nll_diff"] = nll_diff
        result["nll_diff_ci"] = (nll_low, nll_high)

    seconds = _optional_pair("base_seconds", base_seconds, "method_seconds", method_seconds, n)
    if seconds is not None:
        for name, arr in (("base_seconds", seconds[0]), ("method_seconds", seconds[1])):
            if (arr < 0).any():
                raise ValueError(f"{name} contains a negative duration")
        base_mean = float(seconds[0].mean())
        method_mean = float(seconds[1].mean())
        if base_mean == 0.0:
            raise ValueError("base_seconds averages to 0; the cost ratio method/base is undefined")
        result["base_seconds_mean"] = base_mean
        result["method_seconds_mean"] = method_mean
        result["cost_ratio"] = method_mean / base_mean
    return result


def _optional_pair(
    base_name: str,
    base_values: Sequence[float] | np.ndarray | None,
    method_name: str,
    method_values: Sequence[float] | np.ndarray | None,
    n: int,
) -> tuple[np.ndarray, np.ndarray] | None:
    """Validate an optional base/method measurement pair; both or neither must be given."""
    if base_values is None and method_values is None:
        return None
    if base_values is None or method_values is None:
        given, missing = (base_name, method_name) if method_values is None else (method_name, base_name)
        raise ValueError(f"{given} was given without {missing}; pass both or neither")
    base_arr = _as_float_array(base_name, base_values)
    method_arr = _as_float_array(method_name, method_values)
    _check_lengths(n, **{base_name: base_arr, method_name: method_arr})
    return base_arr, method_arr
