"""dtype helpers for the per-layer hot path."""

from __future__ import annotations

import torch


def as_float32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, without a dispatched op when it already is.

    A dtype check in Python is free; a no-op ``.float()`` is still a dispatched op, paid per layer and
    forward.
    """
    return t if t.dtype == torch.float32 else t.float()
