"""Activation checkpointing of a patched model's decoder blocks, for refinement's surrogate step.

The surrogate step back-propagates through the whole model over the prompt and its target, so by default
autograd keeps every block's activations until the backward reaches it: most of the step's memory
(BENCHMARKS.md, "Refinement: memory of the surrogate step"). Under `checkpointed_blocks` each decoder block
keeps only its inputs and runs its forward again when the backward needs the rest: one more forward of
the blocks, the same numbers.

A VPS layer's forward is not a pure function of its input: it consumes the gradient captured by the last
backward, counts fallbacks and reads the forward's mask, phase and entropy from the model's context, which
the forward's end has cleared by the time the backward recomputes a block. The recompute therefore runs
inside `VPSContext.replay` of the state taken when the block first ran, where the layers plan from what
they planned with the first time and change no state.

PyTorch's non-reentrant `torch.utils.checkpoint` does the recompute (its ``context_fn`` enters the replay);
transformers' own switch (``gradient_checkpointing_enable``) is not used because it acts only in training
mode, and the step runs the model in evaluation mode (no dropout).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..patching import get_context

__all__ = ["checkpointed_blocks", "decoder_blocks"]


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's decoder blocks: transformers' checkpointable layers (``GradientCheckpointingLayer``), outermost
    only. A ValueError naming the model's class when it has none."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    blocks: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer) and not any(_contains(b, module) for b in blocks):
            blocks.append(module)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no transformers GradientCheckpointingLayer blocks, so its "
                         "activations cannot be checkpointed; refine without checkpoint_activations")
    return blocks


def _contains(outer: nn.Module, module: nn.Module) -> bool:
    return any(m is module for m in outer.modules())


@contextlib.contextmanager
def checkpointed_blocks(model: nn.Module) -> Iterator[None]:
    """Inside the block, every decoder block of the patched ``model`` keeps only its inputs for backward and
    recomputes the rest there (VPS layers replaying their plans); afterwards the blocks run as before.

    The forwards inside must not write a KV cache (pass ``use_cache=False``): a recompute would write it again.
    """
    ctx = get_context(model)

    def context_fn() -> tuple[contextlib.AbstractContextManager[None], contextlib.AbstractContextManager[None]]:
        # Called as each block starts its forward, while the model's forward state is still current.
        return contextlib.nullcontext(), ctx.replay(ctx.forward_state())

    def checkpointed(forward: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(forward)
        def run(*args: Any, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():  # nothing to recompute for
                return forward(*args, **kwargs)
            return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, context_fn=context_fn,
                                                     **kwargs)
        return run

    blocks = decoder_blocks(model)
    # An instance attribute shadows the class's forward for this block alone. A block may hold one already
    # (accelerate's device hooks do): it is wrapped, and put back afterwards.
    own = [block.__dict__.get("forward") for block in blocks]
    for block in blocks:
        block.forward = checkpointed(block.forward)
    try:
        yield
    finally:
        for block, forward in zip(blocks, own, strict=True):
            if forward is None:
                del block.forward
            else:
                block.forward = forward
