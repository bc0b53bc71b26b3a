"""Unit handling with pint: a lazily built registry, parsing and conversion.

Both losses that read units use it: ``numeric`` compares a prediction in the gold unit where pint can
convert, and ``units`` scores dimensional agreement. It lives apart from either so that each loss
imports it, and neither the other.
"""

from __future__ import annotations

import math
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pint

__all__ = ["registry", "parse_unit", "convert"]

# pint's parser is its own tokenizer (no eval), but it is still handed untrusted text,
# so anything longer than a plausible unit is refused before it gets there.
MAX_UNIT_CHARS = 64

# Currencies get one dimension each, so "$5" and "500 cents" agree while "$5" and "€5"
# are incompatible (no exchange rates on purpose: an answer in the wrong currency is wrong).
_CURRENCY_DEFINITIONS = (
    "USD = [currency_usd] = _ = dollar",
    "cent = 0.01 USD",
    "EUR = [currency_eur] = _ = euro",
    "GBP = [currency_gbp]",
    "JPY = [currency_jpy] = _ = yen",
    "INR = [currency_inr] = _ = rupee",
)

_registry: pint.UnitRegistry[Any] | None = None
_registry_lock = threading.Lock()


def registry() -> pint.UnitRegistry[Any]:
    """The shared pint registry, built on first use (building one takes a noticeable time)."""
    global _registry
    if _registry is None:
        with _registry_lock:
            if _registry is None:
                import pint

                ureg: pint.UnitRegistry[Any] = pint.UnitRegistry()
                for definition in _CURRENCY_DEFINITIONS:
                    ureg.define(definition)
                _registry = ureg
    return _registry


def parse_unit(unit: str) -> Any | None:
    """The pint unit for ``unit``, or None where pint does not know it (``"apples"``)."""
    if not unit or len(unit) > MAX_UNIT_CHARS:
        return None
    try:
        return registry().parse_units(unit.replace("°", "deg").replace("²", "^2").replace("³", "^3"))
    except Exception:  # pint raises a zoo of types on odd text; all mean "not a unit we know"
        return None


def convert(number: float, unit: str, to_unit: str) -> float | None:
    """``number`` in ``unit`` expressed in ``to_unit``; None if either is unknown or they are
    dimensionally incompatible."""
    src, dst = parse_unit(unit), parse_unit(to_unit)
    if src is None or dst is None:
        return None
    import pint

    try:
        value = registry().Quantity(number, src).to(dst).magnitude
    except pint.DimensionalityError:
        return None
    return float(value) if math.isfinite(value) else None
