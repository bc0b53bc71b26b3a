"""Reading an arithmetic expression in answer text exactly: ``5 + 3``, ``2**10``, ``\\frac{1}{2} \\cdot 4``.

An answer after ``####`` or in a box may be an expression rather than a number. Cutting it to the number
it starts with gave wrong verdicts (``#### 2*x + 1`` read as 2), so the extractor reads the expression
whole: a constant one has a value, one with variables has none and is compared algebraically.

Answer text is untrusted and this runs in the caller's process, so nothing here calls ``eval`` or sympy
(which the algebraic check runs in a separate, killable process): a whitelist tokenizer and a small
recursive-descent parser over :class:`fractions.Fraction`, with every size bounded so that no input
costs more than linear time.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from fractions import Fraction

__all__ = ["NUMBER", "MAX_EXPRESSION_CHARS", "Expression", "read_expression", "same_expression"]

#: A written number: thousands separators only in groups of exactly three digits, ``.5`` and ``3.``, and
#: scientific notation (``6.02e23``, ``1E-3``). Without the exponent, ``#### 1e3`` read as ``1e`` and matched a
#: gold ``1e5``. The exponent has at most three digits, so ``1e999999999`` (a number exact arithmetic would spend
#: gigabytes on) is no number at all rather than a slow one.
NUMBER = r"(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d{1,3}(?!\d))?"

#: Text beyond this many characters is never one answer expression.
MAX_EXPRESSION_CHARS = 200
MAX_DEPTH = 40
# Exact powers are computed only while the result stays this small (10**1204 is about 4000 bits);
# beyond it the value is far outside a float anyway, so it is reported as having none.
MAX_RESULT_BITS = 4000
# Letter runs up to this long are products of variables ("xy"); longer ones are words.
MAX_LETTER_RUN = 3
_FUNCTIONS = frozenset({"sqrt", "sin", "cos", "tan", "ln", "log", "exp"})
_CONSTANTS = frozenset({"pi"})
_OPENERS = {"(": ")", "[": "]", "{": "}"}
_MULTIPLY = frozenset({"*", "×", "·", "\\cdot", "\\times"})
_DIVIDE = frozenset({"/", "÷", "\\div"})

_TOKEN_RE = re.compile(
    r"(?P<space>[\s$]+)"  # "$" is a currency sign or a LaTeX math delimiter here, never a value
    r"|(?P<num>" + NUMBER + r")"
    r"|(?P<op>\*\*|[-+*/^×÷·]|\\(?:cdot|times|div)(?![A-Za-z]))"
    r"|(?P<open>[(\[{])|(?P<close>[)\]}])"
    r"|(?P<word>\\?[A-Za-z]+)"
)


class _NotArithmetic(Exception):
    """The text at hand is not an expression this reader accepts."""


@dataclass(frozen=True)
class _Token:
    kind: str
    text: str
    start: int
    end: int
    spaced: bool  # whitespace before it: "5 apples" ends an expression, "5x" does not


@dataclass(frozen=True)
class Expression:
    """An arithmetic expression read from the start of a text.

    Attributes:
        text: the expression as written (surrounding space removed).
        end: where it ends in the text it was read from.
        value: its value (``\\sqrt{2}`` and ``\\pi`` to float precision); None when it has variables or
            functions other than square roots (``2*x + 1``, ``\\ln 2``), is undefined (``1/0``,
            ``\\sqrt{-1}``) or is too large for a float (``10**10**10``).
        starts_with_number: whether its first operand (after any sign) is a number.
        variables: the single-letter variables it uses (``xy`` is ``x`` times ``y``).
        has_operator: whether it holds a written binary operator (``+ - * / ^``, ``\\cdot`` ...), not
            only a sign or a glued letter: in running text "6g" is more likely 6 grams than 6 times g.
    """

    text: str
    end: int
    value: float | None
    starts_with_number: bool
    has_operator: bool
    variables: frozenset[str] = frozenset()


def _tokens(text: str) -> Iterator[_Token]:
    """Tokens up to the first character no expression holds (the rest is prose, or not ours).

    Lazy, so a parse that stops after one word ("the answer is the ...") reads no further; and it
    stops past :data:`MAX_EXPRESSION_CHARS`, since an expression that reaches so far is refused anyway.
    """
    pos, spaced = 0, False
    while pos < len(text) and pos <= MAX_EXPRESSION_CHARS:
        m = _TOKEN_RE.match(text, pos)
        if m is None:
            return
        kind = m.lastgroup or ""
        if kind == "space":
            spaced = True
        else:
            yield _Token(kind, m.group(), m.start(), m.end(), spaced)
            spaced = False
        pos = m.end()


def _power(base: Fraction | None, exponent: Fraction | None) -> Fraction | None:
    if base is None or exponent is None:
        return None
    if base == 0:
        return None if exponent < 0 else Fraction(1) if exponent == 0 else Fraction(0)
    if exponent.denominator == 1:
        n = abs(exponent.numerator)
        bits = max(base.numerator.bit_length(), base.denominator.bit_length()) * n
        if bits > MAX_RESULT_BITS and abs(base) != 1:
            return None
        return base**exponent.numerator
    if base <= 0:
        return None  # a root of a negative number has no real value here
    try:
        value = float(base) ** float(exponent)
    except OverflowError:
        return None
    return Fraction(value) if math.isfinite(value) else None


class _Parser:
    """expr := term (('+'|'-') term)*; term := unary (('*'|'/') unary | glued operand)*;
    unary := ('+'|'-') unary | power; power := primary (('^'|'**') unary)?"""

    def __init__(self, tokens: Iterator[_Token], values: Mapping[str, Fraction] | None = None) -> None:
        self.tokens = tokens
        self.values = values  # variable values to evaluate at; None: variables have no value
        self.variables: set[str] = set()
        self.next: _Token | None = next(tokens, None)
        self.last: _Token | None = None  # the last token taken: where the expression ends
        self.first: _Token | None = None  # the first operand that is not a sign
        self.depth = 0
        self.operators = 0  # written binary operators taken

    def peek(self) -> _Token | None:
        return self.next

    def take(self) -> _Token:
        token = self.next
        if token is None:
            raise _NotArithmetic("unexpected end")
        if self.first is None and not (token.kind == "op" and token.text in "+-"):
            self.first = token
        self.last, self.next = token, next(self.tokens, None)
        return token

    def nested(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _NotArithmetic("nested too deeply")

    def expr(self) -> Fraction | None:
        self.nested()
        value = self.term()
        while (token := self.peek()) is not None and token.kind == "op" and token.text in "+-":
            self.take()
            self.operators += 1
            rhs = self.term()
            value = None if value is None or rhs is None else value + rhs if token.text == "+" else value - rhs
        self.depth -= 1
        return value

    def glued_operand(self, token: _Token | None) -> bool:
        """Implicit multiplication: "2x", "2(x+1)", "(a)(b)"; never after a space ("4 (since ...)"),
        and never a glued fraction: "2\\frac{1}{2}" is the mixed number 2.5, not 2 * 1/2."""
        return token is not None and not token.spaced and (
            token.kind == "open" or (token.kind == "word" and token.text != "\\frac" and self.is_symbol(token.text))
        )

    def term(self) -> Fraction | None:
        value = self.unary()
        while True:
            token = self.peek()
            if token is not None and token.kind == "op" and (token.text in _MULTIPLY or token.text in _DIVIDE):
                self.take()
                self.operators += 1
                rhs = self.unary()
                if value is None or rhs is None:
                    value = None
                elif token.text in _MULTIPLY:
                    value = value * rhs
                else:
                    value = None if rhs == 0 else value / rhs
            elif self.glued_operand(token):
                rhs = self.power()
                value = None if value is None or rhs is None else value * rhs
            else:
                return value

    def unary(self) -> Fraction | None:
        token = self.peek()
        if token is not None and token.kind == "op" and token.text in "+-":
            self.take()
            self.nested()
            operand = self.unary()
            self.depth -= 1
            return None if operand is None else -operand if token.text == "-" else operand
        return self.power()

    def power(self) -> Fraction | None:
        base = self.primary()
        token = self.peek()
        if token is not None and token.kind == "op" and token.text in ("^", "**"):
            self.take()
            self.operators += 1
            self.nested()
            exponent = self.unary()
            self.depth -= 1
            return _power(base, exponent)
        return base

    @staticmethod
    def is_symbol(word: str) -> bool:
        name = word.lstrip("\\")
        if word.startswith("\\"):
            return name in _FUNCTIONS or name in _CONSTANTS or name == "frac"
        return name in _FUNCTIONS or name in _CONSTANTS or len(name) <= MAX_LETTER_RUN

    def group(self) -> Fraction | None:
        opener = self.take()
        if opener.kind != "open":
            raise _NotArithmetic(f"expected a bracket, got {opener.text!r}")
        self.nested()
        value = self.expr()
        closer = self.take()
        if closer.text != _OPENERS[opener.text]:
            raise _NotArithmetic("unbalanced brackets")
        self.depth -= 1
        return value

    def primary(self) -> Fraction | None:
        token = self.peek()
        if token is None:
            raise _NotArithmetic("unexpected end")
        if token.kind == "num":
            self.take()
            return Fraction(token.text.replace(",", ""))
        if token.kind == "open":
            return self.group()
        if token.kind == "word" and self.is_symbol(token.text):
            self.take()
            name = token.text.lstrip("\\")
            if name == "frac":
                numerator, denominator = self.group(), self.group()
                if numerator is None or denominator is None or denominator == 0:
                    return None
                return numerator / denominator
            if name == "sqrt":
                return self.root()
            if name == "pi":
                return Fraction(math.pi)
            if name in _FUNCTIONS:
                self.primary()  # the argument: checked, but the value stays symbolic
                return None
            self.variables.update(name)
            if self.values is None or any(letter not in self.values for letter in name):
                return None
            return math.prod((self.values[letter] for letter in name), start=Fraction(1))
        raise _NotArithmetic(f"unexpected {token.text!r}")

    def root(self) -> Fraction | None:
        """``\\sqrt{x}``, ``\\sqrt[n]{x}``, ``sqrt(x)``, ``\\sqrt 2``: a value to float precision, as
        a numeric gold such as 1.41421356237 is compared within a tolerance anyway."""
        index: Fraction | None = Fraction(2)
        token = self.peek()
        if token is not None and token.text == "[":
            index = self.group()
        radicand = self.primary()
        if index is None or radicand is None or index == 0:
            return None
        return _power(radicand, 1 / index)


def read_expression(text: str, *, whole: bool, values: Mapping[str, Fraction] | None = None) -> Expression | None:
    """The arithmetic expression that starts ``text``, or None where none does.

    Numbers, ``+ - * / ^ **``, ``× ÷ ·``, ``\\cdot \\times \\div``, brackets, ``\\frac{a}{b}``, implicit
    multiplication of a glued bracket or variable (``2(x+1)``, ``3x``), single-letter variables (runs up
    to three letters: ``xy`` is ``x*y``), ``pi`` and ``sqrt sin cos tan ln log exp``. A word after a
    complete expression and a space ends it (``5 + 3 apples`` is ``5 + 3``); with ``whole`` the
    expression must be all of ``text``. Longer than :data:`MAX_EXPRESSION_CHARS`: None.
    ``values`` gives variables a value (``{"x": Fraction(3)}``), for :func:`same_expression`.
    """
    if whole and len(text.strip()) > MAX_EXPRESSION_CHARS:
        return None
    parser = _Parser(_tokens(text), values)
    if parser.peek() is None:
        return None
    start = parser.peek().start  # type: ignore[union-attr]
    try:
        value = parser.expr()
    except (_NotArithmetic, RecursionError, ValueError, ZeroDivisionError):
        return None
    assert parser.last is not None  # expr() took at least one token or raised
    end = parser.last.end
    if whole and text[end:].strip():
        return None
    if end > MAX_EXPRESSION_CHARS:
        return None
    number: float | None = None
    if value is not None:
        try:
            number = float(value)
        except OverflowError:
            number = None
        if number is not None and not math.isfinite(number):
            number = None
    first = parser.first
    return Expression(
        text=text[start:end].strip(),
        end=end,
        value=number,
        starts_with_number=first is not None and first.kind == "num",
        has_operator=parser.operators > 0,
        variables=frozenset(parser.variables),
    )


#: Points at which :func:`same_expression` evaluates; two different rational functions of low degree
#: agree at all of them with negligible probability (Schwartz-Zippel), and exact arithmetic has no
#: rounding to blur a real difference.
PROBES = 4
_MATHS_RE = re.compile(r"[\d+\-*/^×÷·]|\\(?:cdot|times|div|frac|sqrt)")


def same_expression(a: str, b: str) -> bool | None:
    """Whether two expressions with variables are the same function, decided in this process.

    Both are evaluated exactly at :data:`PROBES` random rational points (a fixed seed, so verdicts
    are reproducible). None when either is no expression this reader evaluates, has no variables,
    or has no value at some point (a root, ``\\ln``, a pole): the caller keeps its other rule then.
    Text with no number and no operator is words, not maths: "no" and "on" are not the product n*o.
    """
    if not (_MATHS_RE.search(a) and _MATHS_RE.search(b)):
        return None
    first, second = read_expression(a, whole=True), read_expression(b, whole=True)
    if first is None or second is None or not (first.variables | second.variables):
        return None
    letters = sorted(first.variables | second.variables)
    rng = random.Random(0)
    for _ in range(PROBES):
        point = {letter: Fraction(rng.randint(11, 97), rng.randint(7, 13)) for letter in letters}
        x, y = read_expression(a, whole=True, values=point), read_expression(b, whole=True, values=point)
        if x is None or y is None or x.value is None or y.value is None:
            return None
        if x.value != y.value:
            return False
    return True
