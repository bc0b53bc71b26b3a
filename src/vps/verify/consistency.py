"""The ``self_consistency`` loss: how many sampled answers agree with the prediction."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .compare import answers_match
from .quantity import Answer

__all__ = ["self_consistency_loss", "majority_answer"]


def majority_answer(samples: Sequence[Answer | None], rel_tol: float) -> tuple[Answer | None, int]:
    """The answer most samples agree with (first seen wins ties) and how many agree with it."""
    best: Answer | None = None
    best_count = 0
    for candidate in samples:
        if candidate is None:
            continue
        count = sum(answers_match(candidate, other, rel_tol) for other in samples)
        if count > best_count:
            best, best_count = candidate, count
    return best, best_count


def self_consistency_loss(
    pred: Answer | None, samples: Sequence[Answer | None] | None, rel_tol: float
) -> tuple[float | None, dict[str, Any]]:
    """``1 - agree / k`` over ``k`` sampled answers, needing no gold.

    A sample agrees when :func:`answers_match` holds (numbers within ``rel_tol``, or equal
    normalised text). Samples with no answer count in ``k`` and never agree; ``pred`` is
    not added to the samples (pass it among them if it was one). Fewer than 2 samples:
    no evidence (None). A prediction with no answer agrees with nothing: 1.0.
    """
    k = 0 if samples is None else len(samples)
    if samples is None or k < 2:
        return None, {"reason": "fewer than 2 samples", "k": k}
    agree = 0 if pred is None else sum(answers_match(pred, sample, rel_tol) for sample in samples)
    majority, majority_count = majority_answer(samples, rel_tol)
    return 1.0 - agree / k, {
        "k": k,
        "agree": agree,
        "majority": None if majority is None else majority.text,
        "majority_fraction": majority_count / k,
    }
