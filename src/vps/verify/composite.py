"""``CompositeVerifier``: the weighted multi-objective verification loss."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from types import MappingProxyType
from typing import Any

from .algebra import SympyWorker, algebraic_loss
from .consistency import self_consistency_loss
from .extract import extract_answer, parse_gold
from .numeric import DEFAULT_REL_SCALE, numeric_loss
from .quantity import Answer
from .units import units_loss

__all__ = ["DEFAULT_WEIGHTS", "CompositeVerifier"]

#: Component weights (design doc section 6.1). Read-only; pass ``weights=`` to change them.
DEFAULT_WEIGHTS: Mapping[str, float] = MappingProxyType(
    {"numeric": 1.0, "units": 0.5, "self_consistency": 0.3, "algebraic": 0.2}
)

AnswerLike = str | Answer | None


def _is_real(value: object) -> bool:
    """A finite int or float; bools are refused, ``True`` as a weight is a bug."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive(name: str, value: float) -> float:
    if not _is_real(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _validated_weights(weights: Mapping[str, float] | None) -> dict[str, float]:
    merged = dict(DEFAULT_WEIGHTS)
    if weights is None:
        return merged
    unknown = sorted(set(weights) - set(DEFAULT_WEIGHTS))
    if unknown:
        raise ValueError(f"unknown weight name(s) {unknown}; expected some of {sorted(DEFAULT_WEIGHTS)}")
    for name, value in weights.items():
        if not _is_real(value) or value < 0:
            raise ValueError(f"weights[{name!r}] must be a finite number >= 0, got {value!r}")
        merged[name] = float(value)
    return merged


def _as_pred(value: AnswerLike, field: str) -> Answer | None:
    if value is None or isinstance(value, Answer):
        return value
    if isinstance(value, str):
        return extract_answer(value)
    raise TypeError(f"{field} must be a str, an Answer or None, got {type(value).__name__}")


def _as_gold(value: AnswerLike) -> Answer | None:
    if isinstance(value, str):
        return parse_gold(value) if value.strip() else None
    return _as_pred(value, "gold")


class CompositeVerifier:
    """Weighted verification loss over four components, each a loss in [0, 1].

    * ``numeric``: graded squared error between predicted and gold numbers;
    * ``units``: dimensional agreement via pint;
    * ``self_consistency``: disagreement of sampled answers with the prediction;
    * ``algebraic``: sympy equivalence of symbolic answers (sandboxed, time-limited).

    A component with nothing to judge reports None ("no evidence"). ``total`` is the
    weighted *mean* over the components with evidence, ``sum(w*l) / sum(w)``, so it stays
    in [0, 1] and is comparable between calls that have evidence for different
    components; it is NaN when no weighted component has evidence. The plain weighted
    sum ``sum(w*l)`` of the design doc is returned as ``weighted_sum``.

    Args:
        weights: overrides merged over :data:`DEFAULT_WEIGHTS`; 0 switches a component off.
        rel_tol: relative tolerance under which two numbers are equal.
        sympy_timeout: seconds allowed for one algebraic check.
        numeric_scale: relative error at which the numeric loss reaches 1 - 1/e.
        worker: sandbox process for the algebraic check (default: one shared per process).

    Raises:
        ValueError: an unknown weight name, a negative or non-finite weight, or a
            non-positive ``rel_tol``/``sympy_timeout``/``numeric_scale``.
    """

    def __init__(
        self,
        weights: Mapping[str, float] | None = None,
        rel_tol: float = 1e-6,
        sympy_timeout: float = 2.0,
        *,
        numeric_scale: float = DEFAULT_REL_SCALE,
        worker: SympyWorker | None = None,
    ) -> None:
        self.weights = _validated_weights(weights)
        self.rel_tol = _positive("rel_tol", rel_tol)
        self.sympy_timeout = _positive("sympy_timeout", sympy_timeout)
        self.numeric_scale = _positive("numeric_scale", numeric_scale)
        self.worker = worker

    def compute_loss(
        self,
        pred: AnswerLike,
        gold: AnswerLike = None,
        samples: Sequence[AnswerLike] | None = None,
    ) -> dict[str, Any]:
        """Score a prediction.

        Args:
            pred: the model's answer: raw text (read with :func:`extract_answer`), an
                :class:`Answer`, or None for no answer.
            gold: the reference: a GSM8K answer field or a bare label (read with
                :func:`parse_gold`), an :class:`Answer`, or None. A pseudo-label (for
                example the samples' majority answer) may be passed here.
            samples: k sampled answers for ``self_consistency`` (raw text or Answers).

        Returns:
            ``{"total", "weighted_sum", "evidence_weight", "components", "no_evidence",
            "details", "weights"}``; ``components`` maps each name to its loss or None,
            ``no_evidence`` lists the names that are None, ``details`` holds per-component
            diagnostics (raw squared error, units, timeout, ...) and the parsed inputs.
        """
        if isinstance(samples, str):
            raise TypeError("samples must be a sequence of answers, not a single str")
        pred_answer = _as_pred(pred, "pred")
        gold_answer = _as_gold(gold)
        sample_answers = None if samples is None else [_as_pred(s, "samples[]") for s in samples]
        scorers = {
            "numeric": lambda: numeric_loss(pred_answer, gold_answer, self.rel_tol, self.numeric_scale),
            "units": lambda: units_loss(pred_answer, gold_answer, self.rel_tol, self.numeric_scale),
            "self_consistency": lambda: self_consistency_loss(pred_answer, sample_answers, self.rel_tol),
            "algebraic": lambda: algebraic_loss(
                pred_answer, gold_answer, self.rel_tol, self.sympy_timeout, self.worker
            ),
        }
        components: dict[str, float | None] = {}
        details: dict[str, Any] = {}
        for name, score in scorers.items():
            if self.weights[name] == 0:
                # Skipped rather than scored: the algebraic check costs a process round trip.
                components[name], details[name] = None, {"reason": "weight is 0"}
            else:
                components[name], details[name] = score()
        evidence = {name: loss for name, loss in components.items() if loss is not None}
        weighted_sum = sum(self.weights[name] * loss for name, loss in evidence.items())
        evidence_weight = sum(self.weights[name] for name in evidence)
        details["inputs"] = {
            "pred": None if pred_answer is None else asdict(pred_answer),
            "gold": None if gold_answer is None else asdict(gold_answer),
            "n_samples": None if sample_answers is None else len(sample_answers),
        }
        return {
            "total": weighted_sum / evidence_weight if evidence_weight > 0 else math.nan,
            "weighted_sum": weighted_sum,
            "evidence_weight": evidence_weight,
            "components": components,
            "no_evidence": [name for name, loss in components.items() if loss is None],
            "details": details,
            "weights": dict(self.weights),
        }
