"""`gather_features`: the plan's gather of selected output features, with a backward that keeps no
copy of the base output alive.

`torch.gather` saves its whole input for the backward pass, although its gradient (a scatter of the
incoming gradient into zeros) reads only the input's shape. Under autograd -- refinement's surrogate
step back-propagates through every patched layer over the whole prompt -- that input is each layer's
base output ``W x``, which nothing else keeps: one (B, T, d_out) tensor per patched layer, about a third
of the step's activation memory on a Qwen2.5-1.5B (benchmarks/surrogate_memory.py). This gather saves
the index and the shape only. Forward and backward are the same operations `torch.gather` runs, so
values and gradients are bit-identical (tests/core/test_lean_gather.py).
"""

from __future__ import annotations

from typing import Any

import torch


class _LeanGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.shape = source.shape
        return torch.gather(source, 2, index)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (index,) = ctx.saved_tensors
        return grad.new_zeros(ctx.shape).scatter_add_(2, index, grad), None


def gather_features(source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``torch.gather(source, 2, index)`` for (B, T, d) ``source``; when autograd records it, the
    backward holds ``index`` and ``source``'s shape rather than ``source`` itself."""
    if torch.is_grad_enabled() and source.requires_grad:
        return _LeanGather.apply(source, index)
    return torch.gather(source, 2, index)
