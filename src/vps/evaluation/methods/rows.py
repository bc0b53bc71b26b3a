"""The row every method writes: the common fields, the gold answer, and the scoring of an output.

A row holds `COMMON_FIELDS`, in that order (None where a field does not apply), then the fields its method
adds (`Method.row_fields`). Every method reads its answer the same way, in the run's extraction mode, and is
scored against the same gold, so that methods differ only in the text they choose.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from ...verify import answers_match
from ..data import Item, gold_value, read_gold

if TYPE_CHECKING:
    from .registry import MethodSpec

__all__ = ["COMMON_FIELDS", "finite", "gold", "new_row", "score"]

COMMON_FIELDS = (
    "id", "index", "config", "method", "oracle", "prompt", "output", "pred", "pred_number", "pred_source",
    "gold", "gold_text", "correct", "tokens", "seconds", "nll", "nll_tokens", "nll_seconds", "batch_size",
)


def gold(item: Item) -> tuple[Any, str | None, Any]:
    """(gold value for the row, gold text, the parsed gold Answer or None)."""
    answer = read_gold(item.answer)
    return gold_value(answer), None if answer is None else answer.text, answer


def finite(x: float | None) -> float | None:
    """``x``, or None for a number that is not finite (rows are strict JSON: null means no value)."""
    return None if x is None or not math.isfinite(x) else x


def new_row(item: Item, spec: MethodSpec, prompt: str, batch_size: int) -> dict[str, Any]:
    """A row of ``spec`` for ``item`` with `COMMON_FIELDS` set: what identifies it and its gold, the rest None."""
    value, text, _ = gold(item)
    return {
        "id": item.id, "index": item.index, "config": spec.name, "method": spec.method, "oracle": spec.oracle,
        "prompt": prompt, "output": None, "pred": None, "pred_number": None, "pred_source": None,
        "gold": value, "gold_text": text, "correct": None, "tokens": None, "seconds": None,
        "nll": None, "nll_tokens": None, "nll_seconds": None, "batch_size": batch_size,
    }


def score(row: dict[str, Any], item: Item, output: str, answer: Any) -> None:
    """Set ``row``'s output, the answer read from it (``answer``, None when there is none) and correctness."""
    row["output"] = output
    if answer is not None:
        row.update(pred=answer.text, pred_number=answer.number, pred_source=answer.source)
    row["correct"] = bool(answers_match(answer, gold(item)[2]))
