"""Refinement with the verifier in the loop: the loop itself, per-layer gains, the ephemeral L-BFGS
memory that preconditions them, and the self-consistency samples (docs/design.md §5-§6).

Names load on first use, so `RefineConfig` and the CLI's choices (`vps.refinement.config`) import no torch.
"""

# ruff: noqa: F401  (the TYPE_CHECKING imports name the lazily loaded exports for type checkers)
from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

_EXPORTS = {
    "DrawnSamples": "samples", "EphemeralLBFGS": "lbfgs", "GainOptimizer": "gains", "RefineConfig": "config",
    "RefineResult": "loop", "SampleCache": "samples", "TraceRow": "loop", "refine": "loop", "refine_many": "loop",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)


if TYPE_CHECKING:
    from .config import RefineConfig
    from .gains import GainOptimizer
    from .lbfgs import EphemeralLBFGS
    from .loop import RefineResult, TraceRow, refine, refine_many
    from .samples import DrawnSamples, SampleCache
