"""Finding the final answer statement in a text: ``####``, ``\\boxed{}``, "the answer is", then the last
number; in a model's output (:func:`extract_answer`) and in a gold label (:func:`parse_gold`). Each
statement is read with :mod:`vps.verify.quantity`.

The rules, and where they differ from lm-evaluation-harness's GSM8K filters, are
written down in ``docs/verification.md``; keep the two in step.
"""

from __future__ import annotations

import decimal
import math
import re
from collections.abc import Iterator

from .arithmetic import read_expression
from .quantity import QUANTITY_RE, Answer, clean, parse_quantity, quantity_answer, quantity_value, read_segment

__all__ = ["EXTRACT_MODES", "extract_answer", "parse_gold"]

# An answer statement longer than this is prose; the cap keeps repeated statements linear.
_MAX_SEGMENT_CHARS = 200

_HASH_RE = re.compile(r"####[ \t]*([^\n]*)")
# "#### 1. Compute the total", "#### Step 2: ..." and "#### Final Answer" are Markdown headings, not
# GSM8K answer lines (chat models such as Qwen2.5 write them); an answer line holds a quantity.
_HEADING_RE = re.compile(r"\s*(?:\d+\.\s+[^\W\d_]|(?:step|part|case)\s*\d|[^\W\d_]{2,}[ \t]+[^\W\d_]{2,})",
                         re.IGNORECASE)
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_IS_RE = re.compile(r"\b(?:final\s+)?answer\s*(?:is\b\s*:?|:|=)", re.IGNORECASE)
# A sentence ends at a full stop followed by space or end of text; a decimal point never is.
_SENTENCE_END_RE = re.compile(r"[.!?;](?=\s|$)|\n")


def _boxed_bodies(text: str) -> list[tuple[int, str]]:
    """``(start, contents)`` of every ``\\boxed{...}`` in order of appearance, nested braces matched.

    One pass with a stack, so unbalanced input such as a thousand ``\\boxed{`` costs
    linear time, not one scan to the end of the text per box.
    """
    body_starts = {m.end() for m in _BOXED_RE.finditer(text)}
    if not body_starts:
        return []
    found: list[tuple[int, str]] = []
    stack: list[int | None] = []
    for i, char in enumerate(text):
        if char == "{":
            stack.append(i + 1 if i + 1 in body_starts else None)
        elif char == "}" and stack:
            start = stack.pop()
            if start is not None:
                found.append((start, text[start:i]))
    return sorted(found)


# Each reader yields (position, answer) lazily, in text order or from the end, so a caller that wants
# only the first or the last valid answer parses no more markers than it must.
def _hash_answers(text: str, from_end: bool = False) -> Iterator[tuple[int, Answer]]:
    matches = list(_HASH_RE.finditer(text))
    for m in reversed(matches) if from_end else matches:
        if _HEADING_RE.match(m.group(1)):
            continue
        answer = parse_quantity(m.group(1), "hash", whole=False)
        if answer is not None:
            yield m.start(), answer


def _boxed_answers(text: str, from_end: bool = False) -> Iterator[tuple[int, Answer]]:
    bodies = _boxed_bodies(text)
    for start, body in reversed(bodies) if from_end else bodies:
        answer = parse_quantity(body, "boxed", whole=True)
        if answer is not None:
            yield start, answer


def _answer_is_answers(text: str, from_end: bool = False) -> Iterator[tuple[int, Answer]]:
    # "The answer is" is often prose ("the answer is not obvious"), so only a segment
    # that starts with a number counts (a number, or an expression such as "2*x + 1").
    matches = list(_ANSWER_IS_RE.finditer(text))
    for m in reversed(matches) if from_end else matches:
        limit = min(len(text), m.end() + _MAX_SEGMENT_CHARS)
        end = _SENTENCE_END_RE.search(text, m.end(), limit)
        answer, states_value = read_segment(text[m.end() : end.start() if end else limit], "answer_is", False)
        if answer is not None and states_value:
            yield m.start(), answer


# The number is a root's radicand: "$\\sqrt{4}$" ends in the answer 2, not 4.
_RADICAND_RE = re.compile(r"(?:\\sqrt|\bsqrt)\s*(?:\[[^\]]{0,20}\]\s*)?[{(]?\s*$")


def _from_last_number(text: str) -> Answer | None:
    cleaned = clean(text)
    last = None
    for m in QUANTITY_RE.finditer(cleaned):
        if quantity_value(m) is not None:
            last = m
    if last is None:
        return None
    root = _RADICAND_RE.search(cleaned, max(0, last.start() - 40), last.start())
    if root is not None:
        expression = read_expression(cleaned[root.start() :], whole=False)
        if expression is not None and expression.value is not None and root.start() + expression.end >= last.end():
            return Answer(text=expression.text, number=expression.value, unit=None, source="last_number")
    return quantity_answer(last, "last_number")


def _first(found: Iterator[tuple[int, Answer]]) -> Answer | None:
    hit = next(found, None)
    return None if hit is None else hit[1]


#: ``flexible``: the first ``####`` answer, else the last box, else the last "answer is", else the
#: last number; ``strict``: the first ``####`` answer only; ``last``: whichever answer marker
#: (``####``, box, "answer is") comes last in the text, else the last number.
EXTRACT_MODES = ("flexible", "strict", "last")


def extract_answer(text: str, mode: str = "flexible") -> Answer | None:
    """The final answer of a model's text, or None where it gives none.

    ``"flexible"`` (the default) prefers, in order: the first ``#### x`` (as lm-eval's strict-match:
    a model that keeps generating after its answer tends to invent a further "Question: ... #### n"),
    the last ``\\boxed{x}`` (models correct themselves before the final box), the last "the (final)
    answer is x", then the last number in the text. ``"strict"`` accepts only ``#### x``.
    ``"last"`` takes whichever of those markers comes last in the text, then the last number: it
    reads a model that states an answer early and then reasons to another one by its conclusion.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if mode not in EXTRACT_MODES:
        raise ValueError(f"mode must be one of {EXTRACT_MODES}, got {mode!r}")
    if mode == "last":
        # The last marker overall is the latest of each kind's last valid one.
        lasts = [hit for read in (_hash_answers, _boxed_answers, _answer_is_answers)
                 if (hit := next(read(text, from_end=True), None)) is not None]
        return max(lasts, key=lambda hit: hit[0])[1] if lasts else _from_last_number(text)
    found = _first(_hash_answers(text))
    if mode == "strict" or found is not None:
        return found
    return (_first(_boxed_answers(text, from_end=True)) or _first(_answer_is_answers(text, from_end=True))
            or _from_last_number(text))


# Two adjacent words: the field is a sentence, not a label or an expression ("She has 18 left").
_PROSE_RE = re.compile(r"[^\W\d_]{2,}[ \t]+[^\W\d_]{2,}")


def _number_text(value: int | float) -> str:
    """A JSON number as plain decimal text that reads back as the same number (no ``1e+20``)."""
    text = format(decimal.Decimal(repr(value)), "f")
    return text[:-2] if text.endswith(".0") and isinstance(value, float) and value.is_integer() else text


def parse_gold(answer_field: str | int | float) -> Answer:
    """The gold answer of a reference solution, read with the same rules as a model's answer.

    In order: the value after the **last** ``####`` (a GSM8K solution has one, and lm-eval takes
    the last too), the last ``\\boxed{}``, the latest "the answer is"; then, for a field with no
    marker, the field taken whole when it is one quantity or expression (source ``"literal"``:
    ``"72"``, ``"$5.50"``, ``"2^10"``, ``"(x-1)(x+1)"``), the last number of a sentence (source
    ``"last_number"``: ``"She has 18 apples left."``), and otherwise the text itself as a
    non-numeric label (``"seven"``). An expression is kept whole (``#### 2*x + 1`` is not 2). A JSON
    number (``4``, ``2.5``) is a literal answer of that value.

    This is the one gold rule: the data loader and the harness both call it.

    Raises:
        TypeError: ``answer_field`` is not a str, an int or a float (a bool is refused).
        ValueError: ``answer_field`` is blank or only punctuation, not finite, or has a marker
            (``####``, a box) and nothing after it.
    """
    if isinstance(answer_field, bool) or not isinstance(answer_field, (str, int, float)):
        raise TypeError(f"answer_field must be a str or a number, got {type(answer_field).__name__}")
    if not isinstance(answer_field, str):
        if not math.isfinite(answer_field):
            raise ValueError(f"answer_field is not a finite number: {answer_field!r}")
        return Answer(text=_number_text(answer_field), number=float(answer_field), unit=None, source="literal")
    if not answer_field.strip():
        raise ValueError("answer_field is empty")
    found = (_first(_hash_answers(answer_field, from_end=True)) or _first(_boxed_answers(answer_field, from_end=True))
             or _first(_answer_is_answers(answer_field, from_end=True)))
    if found is not None:
        return found
    if "####" in answer_field or _BOXED_RE.search(answer_field):
        # A marker says where the answer is; reading something else instead would invent a gold.
        raise ValueError(f"answer_field has a '####' or box with no answer after it: {answer_field[-80:]!r}")
    literal = parse_quantity(answer_field, "literal", whole=True)
    if literal is None:
        raise ValueError(f"answer_field holds only punctuation: {answer_field[:80]!r}")
    if literal.number is None and _PROSE_RE.search(answer_field):
        return _from_last_number(answer_field) or literal
    return literal
