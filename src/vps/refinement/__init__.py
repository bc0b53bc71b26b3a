"""Refinement with the verifier in the loop: the loop itself, per-layer gains, the ephemeral L-BFGS
memory that preconditions them, and the self-consistency samples (docs/design.md §5-§6).

Names load on first use, so `RefineConfig` and the CLI's choices (`vps.refinement.config`) import no torch.
"""

# ruff: noqa: F401  (the TYPE_CHECKING imports name the lazily loaded exports for type checkers)
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "DrawnSamples": "samples", "EphemeralLBFGS": "lbfgs", "GainOptimizer": "gains", "RefineConfig": "config",
    "RefineResult": "loop", "SampleCache": "samples", "TraceRow": "loop", "refine": "loop", "refine_many": "loop",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:
    from .config import RefineConfig
    from .gains import GainOptimizer
    from .lbfgs import EphemeralLBFGS
    from .loop import RefineResult, TraceRow, refine, refine_many
    from .samples import DrawnSamples, SampleCache
