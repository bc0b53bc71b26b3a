"""Refinement with the verifier in the loop: the loop itself, per-layer gains, the ephemeral L-BFGS
memory that preconditions them, and the self-consistency samples (docs/design.md §5-§6)."""

from .gains import GainOptimizer
from .lbfgs import EphemeralLBFGS
from .loop import RefineResult, refine, refine_many
from .samples import DrawnSamples, SampleCache

__all__ = ["DrawnSamples", "EphemeralLBFGS", "GainOptimizer", "RefineResult", "SampleCache", "refine", "refine_many"]
