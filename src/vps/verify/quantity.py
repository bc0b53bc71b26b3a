"""Reading one answer segment (what follows ``####``, a box's body, ...): the quantity or expression it
states, with its unit, as an :class:`Answer`; and the :class:`Answer` type every reader returns.

The rules for numbers, units, currencies and approximations are written down in ``docs/verification.md``
("What counts as a number"); keep the two in step.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .arithmetic import NUMBER, read_expression

__all__ = [
    "Answer", "QUANTITY_RE", "SOURCES", "after_equals", "clean", "parse_quantity", "quantity_answer",
    "quantity_value", "read_segment",
]

#: Where an :class:`Answer` came from. ``literal`` is only produced by :func:`~vps.verify.extract.parse_gold`
#: for a gold label given without any answer marker (``"72"``, ``"(x-1)(x+1)"``).
SOURCES = ("hash", "boxed", "answer_is", "last_number", "literal")

# Unit text longer than this is prose, not a unit; pint is also never handed more.
_MAX_UNIT_CHARS = 40

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
QUANTITY_RE = re.compile(_QUANTITY)
_APPROX = r"\s*(?:(?:approximately|approx\.?|about|around|roughly|exactly|only|just|~|≈)\s*)?"
_APPROX_RE = re.compile(_APPROX)
_QUANTITY_PREFIX_RE = re.compile(_APPROX + _QUANTITY)
_TRAILING_PUNCT = ".,;:!?*'\"` \t\n"

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


def clean(text: str) -> str:
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


def quantity_value(m: re.Match[str]) -> float | None:
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


def quantity_answer(m: re.Match[str], source: str) -> Answer | None:
    value = quantity_value(m)
    unit, text = _unit_and_text(m)
    if value is None:
        return Answer(text=text, number=None, unit=None, source=source) if text else None
    return Answer(text=text, number=value, unit=unit, source=source)


def after_equals(segment: str) -> str:
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


def read_segment(segment: str, source: str, whole: bool) -> tuple[Answer | None, bool]:
    """:func:`parse_quantity`, and whether the segment states a value: a quantity, or an expression
    that starts with a number and has a written operator (``2*x + 1``), as opposed to prose
    (``not obvious``) or a number glued to a letter (``6g``, read as before: not an answer statement)."""
    raw = segment.strip().rstrip(_TRAILING_PUNCT).strip()
    if not raw:
        return None, False
    if _FACTORIAL_RE.match(segment):
        return Answer(text=segment.strip(), number=None, unit=None, source=source), False
    # The lstrip takes the "*" that "***7***" (bold italic) leaves once its "**" are gone.
    cleaned = after_equals(clean(raw)).strip().rstrip(_TRAILING_PUNCT).lstrip("*")
    start = _APPROX_RE.match(cleaned).end()  # type: ignore[union-attr]  # it matches the empty string
    m = _QUANTITY_PREFIX_RE.match(cleaned)
    quantity = None if m is None else quantity_answer(m, source)
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
    return read_segment(segment, source, whole)[0]
