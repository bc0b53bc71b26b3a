"""A whitelist parser from answer text to sympy, and the equivalence check run on it.

Model output is untrusted. ``sympy.sympify`` and ``parse_expr`` evaluate Python, so no
answer text ever reaches them: this module tokenizes against a whitelist and builds
sympy objects directly (``Symbol``, ``Rational``, ``Add``, ``Mul``, ``Pow``).

The module doubles as the sandbox worker script (``python safe_sympy.py``), run by
:mod:`vps.verify.algebra` in a separate process that is killed when a check overruns.
It therefore imports nothing from ``vps``. Run that way its own directory is
``sys.path[0]``; none of the sibling module names shadows a standard or sympy module.
"""

from __future__ import annotations

import fractions
import json
import math
import random
import re
import sys
from typing import Any

import sympy

__all__ = ["ParseError", "parse_expression", "check_equivalent", "serve"]

MAX_EXPR_CHARS = 200
MAX_NUMBER_DIGITS = 40
MAX_EXPONENT = 100
# Numeric powers are evaluated at construction; beyond this many bits they are refused.
MAX_RESULT_BITS = 4000
MAX_DEPTH = 40
# Letter runs longer than this are prose, not a product of variables.
MAX_LETTER_RUN = 3

_FUNCTIONS = {
    "sqrt": sympy.sqrt,
    "sin": sympy.sin,
    "cos": sympy.cos,
    "tan": sympy.tan,
    "ln": sympy.log,
    "log": sympy.log,
    "exp": sympy.exp,
}
_CONSTANTS = {"pi": sympy.pi}
# LaTeX commands that are just spelling of an operator or of nothing at all.
_COMMAND_REWRITES = {
    "\\cdot": "*",
    "\\times": "*",
    "\\div": "/",
    "\\left": "",
    "\\right": "",
    "\\dfrac": "\\frac",
    "\\tfrac": "\\frac",
    "\\,": " ",
    "\\!": "",
    "\\;": " ",
    "\\:": " ",
}
_TOKEN_RE = re.compile(
    r"\s+|(?P<num>\d+\.?\d*|\.\d+)|(?P<cmd>\\[A-Za-z]+)|(?P<word>[A-Za-z]+)|(?P<op>\*\*|[-+*/^(){}\[\]])"
)


class ParseError(ValueError):
    """The text is not an expression this parser accepts."""


def _tokenize(text: str) -> list[tuple[str, str]]:
    if len(text) > MAX_EXPR_CHARS:
        raise ParseError(f"expression longer than {MAX_EXPR_CHARS} characters")
    for latex, plain in _COMMAND_REWRITES.items():
        text = text.replace(latex, plain)
    text = text.replace("\u2212", "-").replace("$", "")
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        if m is None:
            raise ParseError(f"unexpected character {text[pos]!r} at {pos}")
        pos = m.end()
        kind = m.lastgroup
        if kind is None:
            continue
        value = m.group(kind)
        if kind == "num" and len(value) > MAX_NUMBER_DIGITS:
            raise ParseError(f"number longer than {MAX_NUMBER_DIGITS} digits")
        if kind == "cmd":
            name = value[1:]
            if name == "frac" or name == "sqrt":
                tokens.append(("latex", name))
            elif name in _FUNCTIONS:
                tokens.append(("func", name))
            elif name in _CONSTANTS:
                tokens.append(("const", name))
            else:
                raise ParseError(f"LaTeX command {value!r} is not supported")
        elif kind == "word":
            if value in _FUNCTIONS:
                tokens.append(("func", value))
            elif value in _CONSTANTS:
                tokens.append(("const", value))
            elif len(value) > MAX_LETTER_RUN:
                raise ParseError(f"word {value!r} is not an expression")
            else:
                # "xy" is the product x*y, the usual reading in an answer.
                tokens.extend(("sym", letter) for letter in value)
        elif kind == "op":
            tokens.append(("op", "^" if value == "**" else value))
        else:
            tokens.append((kind, value))
    return tokens


def _checked_pow(base: sympy.Expr, exp: sympy.Expr) -> sympy.Expr:
    """``base ** exp`` with the exponent and the size of evaluated numbers bounded."""
    if exp.is_Number:
        if abs(exp) > MAX_EXPONENT:
            raise ParseError(f"exponent larger than {MAX_EXPONENT}")
        if base.is_Rational and exp.is_Integer:
            bits = max(int(base.p).bit_length(), int(base.q).bit_length()) * abs(int(exp))
            if bits > MAX_RESULT_BITS:
                raise ParseError("number too large")
    return sympy.Pow(base, exp)


class _Parser:
    """Recursive descent: expr := term (+|- term)*; term := unary ((*|/|implicit) unary)*;
    unary := (+|-) unary | power; power := primary (^ unary)?."""

    _OPENERS = {"(": ")", "{": "}", "[": "]"}

    def __init__(self, tokens: list[tuple[str, str]]) -> None:
        self.tokens = tokens
        self.pos = 0
        self.depth = 0

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> tuple[str, str]:
        token = self.peek()
        if token is None:
            raise ParseError("unexpected end of expression")
        self.pos += 1
        return token

    def expect(self, value: str) -> None:
        token = self.take()
        if token != ("op", value):
            raise ParseError(f"expected {value!r}, got {token[1]!r}")

    def parse(self) -> sympy.Expr:
        if not self.tokens:
            raise ParseError("empty expression")
        expr = self.expr()
        if self.peek() is not None:
            raise ParseError(f"unexpected {self.peek()[1]!r}")  # type: ignore[index]
        return expr

    def expr(self) -> sympy.Expr:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ParseError(f"expression nested deeper than {MAX_DEPTH}")
        result = self.term()
        while self.peek() in (("op", "+"), ("op", "-")):
            op = self.take()[1]
            rhs = self.term()
            result = sympy.Add(result, rhs if op == "+" else sympy.Mul(-1, rhs))
        self.depth -= 1
        return result

    def starts_primary(self) -> bool:
        token = self.peek()
        return token is not None and (token[0] != "op" or token[1] in self._OPENERS)

    def term(self) -> sympy.Expr:
        result = self.unary()
        while True:
            token = self.peek()
            if token in (("op", "*"), ("op", "/")):
                self.take()
                rhs = self.unary()
                result = sympy.Mul(result, rhs if token[1] == "*" else _checked_pow(rhs, sympy.Integer(-1)))
            elif self.starts_primary():
                result = sympy.Mul(result, self.power())
            else:
                return result

    def unary(self) -> sympy.Expr:
        token = self.peek()
        if token in (("op", "+"), ("op", "-")):
            self.take()
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise ParseError(f"expression nested deeper than {MAX_DEPTH}")
            operand = self.unary()
            self.depth -= 1
            return sympy.Mul(-1, operand) if token[1] == "-" else operand
        return self.power()

    def power(self) -> sympy.Expr:
        base = self.primary()
        if self.peek() == ("op", "^"):
            self.take()
            return _checked_pow(base, self.unary())
        return base

    def group(self) -> sympy.Expr:
        """A braced or bracketed sub-expression, e.g. a ``\\frac`` argument."""
        kind, value = self.take()
        if kind != "op" or value not in self._OPENERS:
            raise ParseError(f"expected a group, got {value!r}")
        inner = self.expr()
        self.expect(self._OPENERS[value])
        return inner

    def primary(self) -> sympy.Expr:
        kind, value = self.take()
        if kind == "num":
            # Via Fraction, not Rational(str): Rational falls back to sympify on a string it cannot read.
            exact = fractions.Fraction(value)
            return sympy.Rational(exact.numerator, exact.denominator)
        if kind == "sym":
            return sympy.Symbol(value)
        if kind == "const":
            return _CONSTANTS[value]
        if kind == "op" and value in self._OPENERS:
            self.pos -= 1
            return self.group()
        if kind == "latex" and value == "frac":
            numerator = self.group()
            return sympy.Mul(numerator, _checked_pow(self.group(), sympy.Integer(-1)))
        if kind == "latex" and value == "sqrt":
            if self.peek() == ("op", "["):
                index = self.group()
                return _checked_pow(self.group(), _checked_pow(index, sympy.Integer(-1)))
            return sympy.sqrt(self.primary_or_group())
        if kind == "func":
            return _FUNCTIONS[value](self.primary_or_group())
        raise ParseError(f"unexpected {value!r}")

    def primary_or_group(self) -> sympy.Expr:
        """A function argument: ``sqrt(x)``, ``\\sqrt{x}`` or ``\\sqrt 2``; a following ``^``
        then applies to the function's value (``\\sqrt{2}^2`` is 2)."""
        return self.primary()


def parse_expression(text: str) -> sympy.Expr:
    """Parse answer text (plain or LaTeX math) into a sympy expression, without eval.

    Accepts numbers, variables (single letters; ``xy`` is ``x*y``), ``pi``, ``+ - * / ^``
    and ``**``, brackets, implicit multiplication (``2x``, ``(x-1)(x+1)``), ``\\frac``,
    ``\\sqrt`` (also ``\\sqrt[n]``), ``\\cdot``, ``\\times`` and sqrt/sin/cos/tan/ln/log/exp.
    ``y = 2x + 1`` is read as its right-hand side.

    Raises:
        ParseError: anything else, or an input past the size limits.
    """
    if text.count("=") == 1:
        lhs, rhs = text.split("=")
        if re.fullmatch(r"\s*[A-Za-z]\s*", lhs):
            text = rhs
    expr = _Parser(_tokenize(text)).parse()
    if expr.has(sympy.zoo, sympy.nan, sympy.oo, -sympy.oo):
        raise ParseError("expression is undefined (division by zero?)")
    return expr


def _close(a: complex, b: complex, rel_tol: float) -> bool:
    return abs(a - b) <= max(rel_tol * max(abs(a), abs(b)), 1e-9)


def _value(expr: sympy.Expr, subs: dict[sympy.Symbol, sympy.Expr] | None = None) -> complex | None:
    try:
        value = complex(expr.evalf(30, subs=subs))
    except (TypeError, ValueError, ZeroDivisionError, OverflowError):
        return None
    return value if math.isfinite(value.real) and math.isfinite(value.imag) else None


def check_equivalent(
    a: str | None,
    b: str | None,
    rel_tol: float = 1e-6,
    a_num: float | None = None,
    b_num: float | None = None,
) -> dict[str, Any]:
    """Whether two answers are the same expression.

    Each side is text to parse, or (``a_num``/``b_num``) an already-known number.
    Constant expressions are compared numerically within ``rel_tol``. Otherwise the
    difference is evaluated at a few random points (any clear disagreement decides
    "different"), then ``expand``/``simplify`` try to prove it zero; if they cannot but
    every point agreed, the answers are taken as equal (method ``"probe"``).

    Returns ``{"status": "ok", "equal": bool, "method": str}`` or
    ``{"status": "parse_error", "side": "pred"|"gold", "error": str}``.
    """
    exprs = []
    for side, text, num in (("pred", a, a_num), ("gold", b, b_num)):
        if num is not None:
            exprs.append(sympy.Float(num))
            continue
        try:
            exprs.append(parse_expression(text or ""))
        except ParseError as err:
            return {"status": "parse_error", "side": side, "error": str(err)}
    x, y = exprs
    if x == y:
        return {"status": "ok", "equal": True, "method": "structural"}
    # Both sides' symbols, not the difference's: in "sqrt(2) + x" vs "x + 1.41421356237" x cancels, and
    # each side still needs a value for it before it can be evaluated.
    symbols = sorted(x.free_symbols | y.free_symbols, key=str)
    if not symbols:
        vx, vy = _value(x), _value(y)
        if vx is None or vy is None:
            return {"status": "ok", "equal": False, "method": "numeric (undefined value)"}
        return {"status": "ok", "equal": _close(vx, vy, rel_tol), "method": "numeric"}
    rng = random.Random(0)
    agreed = 0
    for _ in range(4):
        point = {s: sympy.Rational(rng.randint(11, 37), rng.randint(7, 13)) for s in symbols}
        vx, vy = _value(x, point), _value(y, point)
        if vx is None or vy is None:
            continue
        if not _close(vx, vy, 1e-9):
            return {"status": "ok", "equal": False, "method": "probe"}
        agreed += 1
    diff = x - y
    if sympy.expand(diff) == 0 or sympy.simplify(diff) == 0:
        return {"status": "ok", "equal": True, "method": "simplify"}
    return {"status": "ok", "equal": agreed >= 2, "method": "probe" if agreed >= 2 else "simplify"}


def _limit_memory(max_bytes: int) -> None:
    """Cap the worker's address space so a blow-up fails fast instead of swapping."""
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (max_bytes, max_bytes))
    except (ImportError, ValueError, OSError):
        pass  # not POSIX, or the limit is locked lower: the parent's timeout still applies


def serve(stdin: Any = None, stdout: Any = None) -> None:
    """Answer JSON-line requests ``{"id", "a", "b", "rel_tol", "a_num", "b_num"}`` until EOF."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    stdout.write(json.dumps({"ready": True}) + "\n")
    stdout.flush()
    for line in stdin:
        request = json.loads(line)
        try:
            reply = check_equivalent(
                request.get("a"),
                request.get("b"),
                float(request.get("rel_tol", 1e-6)),
                request.get("a_num"),
                request.get("b_num"),
            )
        except (MemoryError, RecursionError) as err:
            reply = {"status": "error", "error": type(err).__name__}
        except Exception as err:  # sympy can fail in many ways on odd input; report, keep serving
            reply = {"status": "error", "error": f"{type(err).__name__}: {err}"}
        reply["id"] = request.get("id")
        stdout.write(json.dumps(reply) + "\n")
        stdout.flush()


if __name__ == "__main__":
    _limit_memory(2 << 30)
    serve()
