"""The activation statistics a plan ranks features by: per-sequence totals of |x| and |W x| over the
valid tokens, and the energy of the base output that the adaptive policy reads.

Both the plan function (`vps.planning.plan_tensors`) and the Q/K coupling's joint ranking
(`VPSLinear._output_ranking`) call them through this module, so a profiler or benchmark that wraps them
here (``vps.bench.profiling``, ``benchmarks/statistics_share.py``) sees every call.
"""

from __future__ import annotations

import torch

from .context import TokenMask
from .dtypes import as_float32


def input_scores(x: torch.Tensor, tm: TokenMask) -> torch.Tensor:
    """Per-sequence total |x| over the valid tokens (float32), (B, d_in).

    The selection ranks features by mean |x|; a row's total is its mean times the row's (positive)
    token count, so it ranks alike and saves a division per statistic.
    """
    return _masked_abs(x, tm).sum(dim=1, dtype=torch.float32)


def output_scores(h0: torch.Tensor, tm: TokenMask) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence total |W x| (B, d_out), ranking as the mean does (see `input_scores`), and the energy
    mean((W x)^2) (B,) over the valid tokens, both float32."""
    a = _masked_abs(h0, tm)
    total = a.sum(dim=1, dtype=torch.float32)
    # The norm reads |h| while it is still in cache: cheaper than a second pass over h itself. It
    # refuses to narrow, so a float64 model accumulates in float64.
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    squares = as_float32(torch.linalg.vector_norm(a, ord=2, dim=(1, 2), dtype=acc).square())
    return total, squares / (tm.count * a.shape[2])


def _masked_abs(t: torch.Tensor, tm: TokenMask) -> torch.Tensor:
    # abs().sum beats vector_norm(ord=1) over the token dimension by ~7x on CPU (measured). Writing
    # |x| into one buffer reused across layers instead of a fresh tensor per layer made no measurable
    # difference to a prefill (vps bench, SmolLM2, 1 thread).
    a = t.abs()
    if tm.pad is not None:
        # Padding is zeroed by a fill, not multiplied by 0: a non-finite value at a padded position
        # must not leak into any statistic.
        a.masked_fill_(tm.pad, 0)
    return a
