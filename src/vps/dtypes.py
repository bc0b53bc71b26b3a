"""dtype helpers and cached constants for the per-layer hot path."""

from __future__ import annotations

import functools

import torch


def as_float32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, without a dispatched op when it already is.

    A dtype check in Python is free; a no-op ``.float()`` is still a dispatched op, paid per layer and
    forward.
    """
    return t if t.dtype == torch.float32 else t.float()


@functools.lru_cache(maxsize=64)
def constant(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``value`` as a 0-dim tensor, built once per (value, dtype, device) rather than per forward.

    A Python number where an op needs a tensor operand (``torch.where``'s other branch, ``fmax``, the
    dividend of a true division) costs one more dispatched op per layer, or changes the arithmetic.
    Never modify the result in place: it is shared.
    """
    return torch.tensor(value, dtype=dtype, device=device)
