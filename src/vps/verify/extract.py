"""Final-answer extraction from model text, and answer comparison.

The rules, and where they differ from lm-evaluation-harness's GSM8K filters, are
written down in ``docs/verification.md``; keep the two in step.
"""

from __future__ import annotations

import decimal
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass

from .arithmetic import NUMBER, read_expression, same_expression

__all__ = [
    "Answer", "EXTRACT_MODES", "SOURCES", "extract_answer", "answers_match", "numbers_match", "parse_gold",
    "parse_quantity", "readings",
]

#: Where an :class:`Answer` came from. ``literal`` is only produced by :func:`parse_gold`
#: for a gold label given without any answer marker (``"72"``, ``"(x-1)(x+1)"``).
SOURCES = ("hash", "boxed", "answer_is", "last_number", "literal")

#: Absolute tolerance used next to the relative one, so 0 matches rounding noise like 1e-12.
ABS_TOL = 1e-9

# Unit text longer than this is prose, not a unit; pint is also never handed more.
_MAX_UNIT_CHARS = 40

# An answer statement longer than this is prose; the cap keeps repeated statements linear.
_MAX_SEGMENT_CHARS = 200

_CURRENCY_SYMBOLS = {"$": "USD", "€": "EUR", "£": "GBP", "¥": "JPY", "₹": "INR"}
# "pound(s)" is deliberately absent: in GSM8K it is almost always a weight.
_CURRENCY_WORDS = {
    "dollar": "USD",
    "dollars": "USD",
    "usd": "USD",
    "bucks": "USD",
    "euro": "EUR",
    "euros": "EUR",
    "eur": "EUR",
    "cent": "cent",
    "cents": "cent",
}
# Words that follow a number in running text without being its unit ("5 and 6", "3 in total").
_NOT_UNITS = frozenset(
    """a an and are as at be because but by each for from has have he her his i if in into is it its
    more of off on or out over she so than that the their them then there these they this those
    to too was we were which while who will with would you""".split()
)

_NUM = NUMBER
_VALUE = (
    r"(?:\\frac\{\s*(?P<fn>-?(?:" + _NUM + r"))\s*\}\{\s*(?P<fd>-?(?:" + _NUM + r"))\s*\}"
    r"|\\frac(?P<fn1>\d)(?P<fd1>\d)"
    r"|(?P<lw>\d+)[ \t]*\\frac\{\s*(?P<ln>\d+)\s*\}\{\s*(?P<ld>\d+)\s*\}"
    r"|(?P<mw>\d+)[ \t]+(?P<mn>\d+)[ \t]*/[ \t]*(?P<md>\d+)(?![\d.,/])"
    r"|(?P<n>" + _NUM + r")[ \t]*/[ \t]*(?P<d>" + _NUM + r")(?![\d/])"
    r"|(?P<x>" + _NUM + r"))"
    # A value glued to one letter, a power or a bracket is algebra ("2x", "3^2", "2(x+1)"),
    # not a number; digits and separators are listed so that backtracking cannot split
    # "25x" into "2" or "1,234x" into "1". Glued words of two or more letters are units ("5km").
    r"(?![\d^(_]|[.,]\d|[A-Za-z](?![A-Za-z]))"
)
_UNIT_WORD = r"[A-Za-z°µ][A-Za-z°µ]*(?:\^-?\d+|[²³])?"
_RATE = r"(?:[ \t]*/[ \t]*|[ \t]+per[ \t]+)" + _UNIT_WORD
_UNIT = (
    r"(?:(?:/[ \t]*|per[ \t]+)"
    + _UNIT_WORD
    + r"|(?:(?:square|sq\.?|cubic)[ \t]+)?"
    + _UNIT_WORD
    + r"(?:"
    + _RATE
    + r")?)"
)
# One quantity: optional sign and currency symbol (either order), a value, then a percent
# sign or a unit. A minus glued to a preceding word or digit is subtraction or a hyphen
# ("10-3", "COVID-19"), not a sign, hence the look-behinds; "5 - 3" is no -3 either.
_QUANTITY = (
    r"(?<![\w.])(?P<s1>[-+])?(?:(?P<cur>[$€£¥₹])[ \t]*)?(?P<s2>[-+])?"
    r"(?<![A-Za-z_])"
    + _VALUE
    + r"(?:[ \t]*(?P<pct>%|percent\b|per[ \t]+cent\b)|[ \t]*(?P<unit>"
    + _UNIT
    + r")(?![\w]))?"
)
_QUANTITY_RE = re.compile(_QUANTITY)
_APPROX = r"\s*(?:(?:approximately|approx\.?|about|around|roughly|exactly|only|just|~|≈)\s*)?"
_APPROX_RE = re.compile(_APPROX)
_QUANTITY_PREFIX_RE = re.compile(_APPROX + _QUANTITY)
_TRAILING_PUNCT = ".,;:!?*'\"` \t\n"

_HASH_RE = re.compile(r"####[ \t]*([^\n]*)")
# "#### 1. Compute the total", "#### Step 2: ..." and "#### Final Answer" are Markdown headings, not
# GSM8K answer lines (chat models such as Qwen2.5 write them); an answer line holds a quantity.
_HEADING_RE = re.compile(r"\s*(?:\d+\.\s+[^\W\d_]|(?:step|part|case)\s*\d|[^\W\d_]{2,}[ \t]+[^\W\d_]{2,})",
                         re.IGNORECASE)
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_IS_RE = re.compile(r"\b(?:final\s+)?answer\s*(?:is\b\s*:?|:|=)", re.IGNORECASE)
# A sentence ends at a full stop followed by space or end of text; a decimal point never is.
_SENTENCE_END_RE = re.compile(r"[.!?;](?=\s|$)|\n")

# A box inside a segment ("#### \\boxed{18}") is decoration too; the boxed reader finds boxes before this.
_LATEX_WRAPPERS_RE = re.compile(
    r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox|operatorname|boxed|fbox)\s*\{([^{}]*)\}")
# "30^\\circ C" is 30 °C: the space before C/F goes with the degree sign.
_DEGREE_RE = re.compile(r"\^\s*(?:\{\s*\\circ\s*\}|\\circ)(?:\s*(?=[CF]\b))?")
_LATEX_SPACING_RE = re.compile(r"\\[,;:! ]|\\quad|\\qquad|\\left|\\right|\\displaystyle")
# "**" between two operands, glued ("2**10") or spaced on both sides ("2 ** 10"), is Python's power;
# anywhere else it is markdown bold. Deleting every "**" read "2**10" as 210.
_OPERAND_END = r"[\w)\]}]"
_OPERAND_START = r"[\w(\[{.+-]"
_STARS_RE = re.compile(
    rf"(?P<power>(?<={_OPERAND_END})\*\*(?={_OPERAND_START})|(?<={_OPERAND_END}[ \t])\*\*(?=[ \t]{_OPERAND_START}))"
    r"|\*\*"
)


@dataclass(frozen=True)
class Answer:
    """A final answer taken from text.

    Attributes:
        text: the answer as written: the matched quantity for numeric answers
            (``"$1,234"``, ``"12 cm"``), the whole marked segment otherwise (``"x^2-1"``).
        number: its numeric value, or ``None`` for a non-numeric answer.
        unit: unit text that followed the number (``"cm"``, ``"km/h"``, ``"apples"``),
            ``"percent"`` for ``%``, or a currency code (``"USD"``) for ``$``/"dollars".
        source: one of :data:`SOURCES`.
    """

    text: str
    number: float | None
    unit: str | None
    source: str

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"Answer.source must be one of {SOURCES}, got {self.source!r}")


def _clean(text: str) -> str:
    """Strip the LaTeX and markdown decoration that sits between a number and its unit."""
    # "{,}" is LaTeX's thousands separator (1{,}234), written so that no space follows the comma.
    text = text.replace("\u2212", "-").replace("\\$", "$").replace("\\%", "%").replace("{,}", ",")
    text = re.sub(r"\\[dt]frac", r"\\frac", text)
    text = _LATEX_WRAPPERS_RE.sub(r" \1", text)
    text = _LATEX_SPACING_RE.sub(" ", text)
    text = _DEGREE_RE.sub("°", text)
    return _STARS_RE.sub(lambda m: m.group("power") or "", text)


def _to_float(s: str) -> float:
    return float(s.replace(",", ""))


def _value(m: re.Match[str]) -> float | None:
    """Numeric value of a :data:`_QUANTITY` match, or None when it is undefined (x/0)."""
    g = m.groupdict()
    try:
        if g["fn"] is not None:
            value = _to_float(g["fn"]) / _to_float(g["fd"])
        elif g["fn1"] is not None:
            value = int(g["fn1"]) / int(g["fd1"])
        elif g["lw"] is not None:
            value = int(g["lw"]) + int(g["ln"]) / int(g["ld"])
        elif g["mw"] is not None:
            value = int(g["mw"]) + int(g["mn"]) / int(g["md"])
        elif g["n"] is not None:
            value = _to_float(g["n"]) / _to_float(g["d"])
        else:
            value = _to_float(g["x"])
    except ZeroDivisionError:
        return None
    if not math.isfinite(value):
        return None
    negative = (g["s1"] == "-") != (g["s2"] == "-")
    return -value if negative else value


def _split_rate(unit: str) -> tuple[str, str]:
    """``"dollars per hour"`` -> ``("dollars", "/hour")``; a unit with no rate -> ``(unit, "")``."""
    m = re.match(r"(.*?)\s*(?:/|\bper\b)\s*(\S.*)$", unit)
    return (m.group(1), "/" + m.group(2)) if m else (unit, "")


def _unit_and_text(m: re.Match[str]) -> tuple[str | None, str]:
    """The normalised unit of a quantity match and the text it covers."""
    end = m.end()
    if m.group("pct"):
        unit: str | None = "percent"
    else:
        unit = m.group("unit")
        value_text = m.group("x") or ""
        # "5. Apples are red" is a sentence end, not "5 Apples"; "42 because" is prose.
        if unit is not None and (
            value_text.endswith(".") or unit.split()[0].lower() in _NOT_UNITS or len(unit) > _MAX_UNIT_CHARS
        ):
            end, unit = m.start("unit"), None
    text = re.sub(r"\s+", " ", m.string[m.start() : end]).strip().rstrip(_TRAILING_PUNCT)
    if unit is not None and unit != "percent":
        unit = re.sub(r"\s+", " ", unit).strip()
        head, rate = _split_rate(unit)
        if m.group("cur"):
            # "$5 per hour" keeps its rate; "$5 apples" is still just dollars.
            return _CURRENCY_SYMBOLS[m.group("cur")] + rate, text
        if not head:
            return "1" + rate, text
        if head.lower() in _CURRENCY_WORDS:
            return _CURRENCY_WORDS[head.lower()] + rate, text
    elif m.group("cur"):
        return _CURRENCY_SYMBOLS[m.group("cur")], text
    return unit, text


def _answer(m: re.Match[str], source: str) -> Answer | None:
    value = _value(m)
    unit, text = _unit_and_text(m)
    if value is None:
        return Answer(text=text, number=None, unit=None, source=source) if text else None
    return Answer(text=text, number=value, unit=unit, source=source)


def _after_equals(segment: str) -> str:
    """``5 + 3 = 8`` answers 8; ``x = 5`` answers 5."""
    return segment.rsplit("=", 1)[-1] if "=" in segment else segment


# An operator after a number continues an expression: "#### 2*x + 1" is not the answer 2.
_CONTINUES_RE = re.compile(r"[ \t]*(?:[-+*/^×÷·]|\\(?:cdot|times|div)(?![A-Za-z]))")
# ... and when an operand follows that operator, the text is an expression, whatever its length: one the
# reader refuses (over 200 characters, say) is not the number it starts with.
_OPERAND_FOLLOWS_RE = re.compile(_CONTINUES_RE.pattern + r"[ \t]*[\d(.]")
# What a reading must not stop at, because the number goes on in a form this reader does not take:
# "1 000 000" (space-grouped digits), "3,5" (a decimal comma, or a list), "12:30" (a time or a ratio),
# "1.2.3" (a version), "1e999999" (an exponent beyond the three digits a number may have). Taking the first
# part of such text as the answer invents one.
_NUMBER_GOES_ON_RE = re.compile(r"[ \t]*\d|[,:.]\d")
# "10!" is a factorial, or an exclamation: either way not plainly the number 10.
_FACTORIAL_RE = re.compile(r"\s*\S*?\d!(?!=)")


def _read_segment(segment: str, source: str, whole: bool) -> tuple[Answer | None, bool]:
    """:func:`parse_quantity`, and whether the segment states a value: a quantity, or an expression
    that starts with a number and has a written operator (``2*x + 1``), as opposed to prose
    (``not obvious``) or a number glued to a letter (``6g``, read as before: not an answer statement)."""
    raw = segment.strip().rstrip(_TRAILING_PUNCT).strip()
    if not raw:
        return None, False
    if _FACTORIAL_RE.match(segment):
        return Answer(text=segment.strip(), number=None, unit=None, source=source), False
    # The lstrip takes the "*" that "***7***" (bold italic) leaves once its "**" are gone.
    cleaned = _after_equals(_clean(raw)).strip().rstrip(_TRAILING_PUNCT).lstrip("*")
    start = _APPROX_RE.match(cleaned).end()  # type: ignore[union-attr]  # it matches the empty string
    m = _QUANTITY_PREFIX_RE.match(cleaned)
    quantity = None if m is None else _answer(m, source)
    if quantity is not None and quantity.number is None:
        quantity = None  # x/0
    operator_follows = (m is not None and not m.group("unit") and not m.group("pct")
                        and _CONTINUES_RE.match(cleaned, m.end()) is not None)
    unread = Answer(text=raw, number=None, unit=None, source=source)
    if (m is not None and quantity is not None and not operator_follows
            and (not whole or not cleaned[m.end():].strip(_TRAILING_PUNCT))):
        goes_on = not m.group("unit") and not m.group("pct") and _NUMBER_GOES_ON_RE.match(cleaned, m.end())
        return (unread, False) if goes_on else (quantity, True)
    expression = read_expression(cleaned[start:], whole=whole)
    # An expression that ends where the first quantity does adds nothing to it ("1 1/2 + ..." stops
    # after "1" because "1 1" is no expression): the quantity, the older and narrower reading, wins.
    if expression is not None and (m is None or start + expression.end > m.end()):
        if _NUMBER_GOES_ON_RE.match(cleaned, start + expression.end):
            return unread, False
        if expression.value is not None:
            return Answer(text=expression.text, number=expression.value, unit=None, source=source), True
        covers_all = not cleaned[start + expression.end :].strip(_TRAILING_PUNCT)
        text = raw if covers_all else expression.text
        return (Answer(text=text, number=None, unit=None, source=source),
                expression.starts_with_number and expression.has_operator)
    if quantity is not None and not whole and not _OPERAND_FOLLOWS_RE.match(cleaned, m.end()):  # type: ignore[union-attr]
        return quantity, True  # "#### 42 - done": an operator, but no expression after it
    return unread, False


def parse_quantity(segment: str, source: str, *, whole: bool) -> Answer | None:
    """Read an answer segment (what follows ``####``, a ``\\boxed{}`` body, ...).

    With ``whole`` the cleaned segment must be one quantity or one expression and nothing else,
    so that ``2x+1`` is not read as 2; otherwise the quantity or expression must start the segment
    and the rest is ignored (``18 dollars, as computed``). An expression is read whole, never cut to
    the number it starts with: a constant one (``5 + 3``, ``2**10``) answers its value, one with
    variables (``2*x + 1``) is non-numeric. A segment that is not numeric keeps its text with
    ``number=None``. Returns None for an empty segment.
    """
    return _read_segment(segment, source, whole)[0]


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
        answer, states_value = _read_segment(text[m.end() : end.start() if end else limit], "answer_is", False)
        if answer is not None and states_value:
            yield m.start(), answer


# The number is a root's radicand: "$\\sqrt{4}$" ends in the answer 2, not 4.
_RADICAND_RE = re.compile(r"(?:\\sqrt|\bsqrt)\s*(?:\[[^\]]{0,20}\]\s*)?[{(]?\s*$")


def _from_last_number(text: str) -> Answer | None:
    cleaned = _clean(text)
    last = None
    for m in _QUANTITY_RE.finditer(cleaned):
        if _value(m) is not None:
            last = m
    if last is None:
        return None
    root = _RADICAND_RE.search(cleaned, max(0, last.start() - 40), last.start())
    if root is not None:
        expression = read_expression(cleaned[root.start() :], whole=False)
        if expression is not None and expression.value is not None and root.start() + expression.end >= last.end():
            return Answer(text=expression.text, number=expression.value, unit=None, source="last_number")
    return _answer(last, "last_number")


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


def _normalise_text(text: str) -> str:
    text = _clean(text).lower()
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
    return _after_equals(_clean(text)).strip()


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
