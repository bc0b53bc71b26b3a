"""Whether two answers agree: numbers with a tolerance (integers exactly), a percentage against its
fraction, non-numeric answers by normalised text or as expressions that agree at random points.

The matching rules are written down in ``docs/verification.md`` ("Gold answers and matching"); keep the
two in step.
"""

from __future__ import annotations

import math
import re

from .arithmetic import same_expression
from .extract import extract_answer
from .quantity import Answer, after_equals, clean

__all__ = ["ABS_TOL", "answers_match", "numbers_match", "readings"]

#: Absolute tolerance used next to the relative one, so 0 matches rounding noise like 1e-12.
ABS_TOL = 1e-9


def _normalise_text(text: str) -> str:
    text = clean(text).lower()
    return re.sub(r"[\s$]|\\!", "", text).rstrip(".")


def _coerce(answer: Answer | str | None) -> Answer | None:
    if answer is None or isinstance(answer, Answer):
        return answer
    if isinstance(answer, str):
        return extract_answer(answer)
    raise TypeError(f"expected Answer, str or None, got {type(answer).__name__}")


def readings(a: Answer, b: Answer) -> list[tuple[float, float]]:
    """The ``(a, b)`` number pairs that may be compared: as written, and where exactly one side is a
    percentage, that side as a fraction too. GSM8K states "45%" as the gold 45, other data as 0.45,
    and 45% is both; a percentage on both sides, or on neither, is compared as written."""
    assert a.number is not None and b.number is not None
    pairs = [(a.number, b.number)]
    if (a.unit == "percent") != (b.unit == "percent"):
        pairs.append((a.number / 100, b.number) if a.unit == "percent" else (a.number, b.number / 100))
    return pairs


def numbers_match(x: float, y: float, rel_tol: float = 1e-6) -> bool:
    """Whether two answer numbers agree: two integers exactly, otherwise within ``rel_tol`` (plus ``ABS_TOL``).

    The relative tolerance exists for rounding (``0.333333`` against 1/3); on integers it only does harm:
    at 1e-6 it let ``1450001`` match a gold ``1450000`` (GSM8K has golds that large). Integers here are
    floats, so beyond 2**53 two different written integers can still compare equal.
    """
    if float(x).is_integer() and float(y).is_integer():
        return x == y
    return math.isclose(x, y, rel_tol=rel_tol, abs_tol=ABS_TOL)


def answers_match(a: Answer | str | None, b: Answer | str | None, rel_tol: float = 1e-6) -> bool:
    """Whether two answers agree, GSM8K-style: numbers by :func:`numbers_match` (integers exactly, others
    within ``rel_tol`` plus ``ABS_TOL``).

    Units are ignored (``"18 dollars"`` matches ``"18"``; ``"2 km"`` does not match
    ``"2000 m"`` here, the verifier's unit-aware components handle that), except that a
    percentage also matches its fraction (``"45%"`` matches 45 and 0.45). Two non-numeric
    answers match on normalised text, or when both are expressions with variables that agree
    exactly at random rational points (``"x + 1"`` matches ``"1 + x"``); a numeric and a
    non-numeric answer never match.
    Strings are read with :func:`extract_answer`; None matches nothing.
    """
    a, b = _coerce(a), _coerce(b)
    if a is None or b is None:
        return False
    if a.number is not None and b.number is not None:
        return any(numbers_match(x, y, rel_tol) for x, y in readings(a, b))
    if a.number is None and b.number is None:
        if _normalise_text(a.text) == _normalise_text(b.text):
            return True
        # "x + 1" and "1 + x" are one answer; the exact probe needs no sympy (see arithmetic.py).
        return bool(same_expression(_expression_text(a.text), _expression_text(b.text)))
    return False


def _expression_text(text: str) -> str:
    """An answer's text as the expression reader takes it: LaTeX decoration off, ``y = `` dropped."""
    return after_equals(clean(text)).strip()
