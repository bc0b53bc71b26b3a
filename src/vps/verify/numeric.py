"""The ``numeric`` loss: a bounded transform of the squared error between answers."""

from __future__ import annotations

import math
from typing import Any

from .compare import numbers_match, readings
from .quantity import Answer
from .unit_conversion import convert

__all__ = ["DEFAULT_REL_SCALE", "graded_error", "numeric_loss"]

#: Relative error at which a wrong answer's loss reaches 1 - 1/e (about 0.63).
DEFAULT_REL_SCALE = 0.1


def graded_error(pred: float, gold: float, rel_tol: float, rel_scale: float) -> tuple[float, dict[str, Any]]:
    """``0`` when ``pred`` matches ``gold`` (:func:`~vps.verify.compare.numbers_match`: integers exactly, others
    within ``rel_tol``), else ``1 - exp(-e / s)``.

    ``e = (pred - gold)**2`` and ``s = (rel_scale * max(|gold|, 1))**2``: the penalty
    depends on the error relative to the gold magnitude (off by 1 on 10 is worse than off
    by 1 on 1000), and the ``max(.., 1)`` keeps a gold of 0 from making every miss a 1.
    With the default scale 0.1: 1 % off -> 0.01, 5 % -> 0.22, 10 % -> 0.63, 20 % -> 0.98.
    """
    diff = pred - gold
    # diff * diff rather than diff ** 2: float ** raises OverflowError where * gives inf.
    squared = diff * diff
    scale = (rel_scale * max(abs(gold), 1.0)) ** 2
    details: dict[str, Any] = {"pred": pred, "gold": gold, "squared_error": squared, "scale": scale}
    if numbers_match(pred, gold, rel_tol):
        return 0.0, {**details, "match": True}
    if math.isnan(squared):
        return 1.0, {**details, "match": False}
    return 1.0 - math.exp(-squared / scale), {**details, "match": False}


def numeric_loss(
    pred: Answer | None, gold: Answer | None, rel_tol: float, rel_scale: float = DEFAULT_REL_SCALE
) -> tuple[float | None, dict[str, Any]]:
    """Loss between the predicted and gold numbers.

    No gold, or a non-numeric gold: no evidence (None). A gold number with no predicted
    number (no answer, or a non-numeric one) is a miss: 1.0. Where both answers carry
    units pint can convert between, the prediction is compared in the gold unit, so
    "2 km" against "2000 m" scores 0; otherwise the raw numbers are compared, a percentage
    on one side only also as its fraction (the closer reading counts, as in ``answers_match``).
    """
    if gold is None:
        return None, {"reason": "no gold"}
    if gold.number is None:
        return None, {"reason": "gold is not numeric", "gold_text": gold.text}
    if pred is None:
        return 1.0, {"reason": "no predicted answer", "gold": gold.number}
    if pred.number is None:
        return 1.0, {"reason": "prediction is not numeric", "pred_text": pred.text, "gold": gold.number}
    value, extra = pred.number, {}
    if (pred.unit == "percent") != (gold.unit == "percent"):
        scored = [graded_error(p, g, rel_tol, rel_scale) for p, g in readings(pred, gold)]
        loss, details = min(scored, key=lambda scored_pair: scored_pair[0])
        return loss, details
    if pred.unit and gold.unit and pred.unit != gold.unit:
        converted = convert(pred.number, pred.unit, gold.unit)
        if converted is not None:
            value, extra = converted, {"converted_from": f"{pred.number} {pred.unit}", "unit": gold.unit}
    loss, details = graded_error(value, gold.number, rel_tol, rel_scale)
    return loss, {**details, **extra}
