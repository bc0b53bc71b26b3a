"""The ``units`` loss: whether the predicted and gold quantities have the same dimensions, and how far
apart they are once converted into the gold unit."""

from __future__ import annotations

from typing import Any

from .numeric import graded_error
from .quantity import Answer
from .unit_conversion import convert, parse_unit

__all__ = ["units_loss"]


def units_loss(
    pred: Answer | None, gold: Answer | None, rel_tol: float, rel_scale: float
) -> tuple[float | None, dict[str, Any]]:
    """Dimensional agreement of the predicted and gold quantities.

    * a unit missing on either side, or one pint does not know: no evidence (None);
    * incompatible dimensions (km vs kg): 1.0;
    * compatible: the prediction is converted into the gold unit and scored like the
      numeric component (0 when equal within ``rel_tol``), so "2 km" vs "2000 m" is 0.
    """
    if pred is None or gold is None:
        return None, {"reason": "no prediction" if pred is None else "no gold"}
    if not pred.unit or not gold.unit:
        return None, {"reason": "unit missing", "pred_unit": pred.unit, "gold_unit": gold.unit}
    src, dst = parse_unit(pred.unit), parse_unit(gold.unit)
    details: dict[str, Any] = {"pred_unit": pred.unit, "gold_unit": gold.unit}
    if src is None or dst is None:
        return None, {**details, "reason": "unit unknown to pint"}
    if src.dimensionality != dst.dimensionality:
        return 1.0, {
            **details,
            "compatible": False,
            "pred_dims": str(src.dimensionality),
            "gold_dims": str(dst.dimensionality),
        }
    details["compatible"] = True
    if pred.number is None or gold.number is None:
        return 0.0, {**details, "reason": "dimensions agree; no magnitude to compare"}
    converted = convert(pred.number, pred.unit, gold.unit)
    if converted is None:
        return 1.0, {**details, "reason": "conversion failed"}
    loss, numeric = graded_error(converted, gold.number, rel_tol, rel_scale)
    return loss, {**details, "pred_in_gold_unit": converted, **numeric}
