"""Per-component spectral clipping of the low-rank factors (docs/design.md §3).

Each rank-1 term ``A_i B_i^T`` of the perturbation has spectral norm ``||A_i|| * ||B_i||``. Bounding
every term by ``tau`` bounds the whole perturbation by ``sqrt(r) * tau``.
"""

from __future__ import annotations

import torch

from .dtypes import constant


def squared_clip_scales(norm_a: torch.Tensor, norm_b: torch.Tensor, tau: float) -> torch.Tensor:
    """Per-component factor ``s_i^2`` by which clipping scales the rank-1 term ``A_i B_i^T``.

    ``s_i^2 = tau / (||A_i|| ||B_i||)`` where the product exceeds ``tau``, else exactly 1 (zero norms
    included); a NaN product gives NaN, so a broken component stays visible. Any leading batch shape.
    """
    # min(tau / prod, 1), divided by a tensor tau: a Python tau would be a reciprocal times tau in
    # torch (2.13), and tau / tau could come out one ulp below 1. So an untouched component gets
    # exactly 1, a zero product too (tau / 0 = inf), a NaN stays NaN; three ops per layer and forward.
    return torch.clamp_max(torch.div(constant(tau, torch.float32, norm_a.device), norm_a * norm_b), 1.0)


def clip_scales(norm_a: torch.Tensor, norm_b: torch.Tensor, tau: float) -> torch.Tensor:
    """Per-component factor ``s_i`` such that ``(s_i A_i, s_i B_i)`` satisfies the clip bound."""
    return squared_clip_scales(norm_a, norm_b, tau).sqrt()


def spectral_clip(A: torch.Tensor, B: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip each rank-1 component of ``A B^T`` to spectral norm at most ``tau``.

    ``A`` is (d_in, r) and ``B`` is (d_out, r) (columns are components; leading batch dimensions are
    allowed). Where ``||A_i|| * ||B_i|| > tau`` both columns are divided by
    ``sqrt(||A_i|| * ||B_i|| / tau)``, so afterwards ``||A_i|| * ||B_i|| <= tau`` up to rounding.
    Returns new tensors; the inputs are not modified.
    """
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau!r}")
    if A.shape[-1] != B.shape[-1]:
        raise ValueError(f"A and B must have the same number of columns (rank), got {A.shape[-1]} and {B.shape[-1]}")
    norm_a = torch.linalg.vector_norm(A.float(), dim=-2)
    norm_b = torch.linalg.vector_norm(B.float(), dim=-2)
    scale = clip_scales(norm_a, norm_b, tau).unsqueeze(-2)
    return (A * scale).to(A.dtype), (B * scale).to(B.dtype)
