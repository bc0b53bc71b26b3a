"""``torch.compile`` for a (patched) model's forward, as `vps generate --compile` and `vps bench --compile` use it.

The patched forward traces as one graph with no breaks in prefill and decode (tests/test_compile.py),
so the whole forward is compiled with ``fullgraph=True``: a break would be a regression and fails
loudly instead of silently running part of the model eagerly. The model-level hooks that read the
attention mask and the next-token entropy run around the compiled forward, eagerly.

Importing this module does not import torch (the command-line parser reads `COMPILE_MODES`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_mode(mode: str, flag: str = "--compile") -> str:
    """``mode`` if it is a ``torch.compile`` mode, else a ValueError naming ``flag``."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"{flag}: expected one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    return mode


def compile_forward(model: Any, mode: str = "default") -> Any:
    """Replace ``model.forward`` by ``torch.compile(model.forward, mode=mode, fullgraph=True)``; returns the model.

    Patch the model first: `vps.patch` swaps layers, which a forward compiled before would only see
    after a recompilation. ``generate()`` uses the compiled forward as is.
    """
    import torch

    check_mode(mode, "mode")
    if getattr(model, "_vps_compiled", None) is not None:
        raise ValueError("this model's forward is already compiled")
    original = model.forward
    # "default" is passed as no mode at all, so a backend other than inductor (tests, debugging) accepts it.
    model.forward = torch.compile(original, mode=None if mode == "default" else mode, fullgraph=True)
    model._vps_compiled = (mode, original)
    return model


def uncompile_forward(model: Any) -> Any:
    """Undo `compile_forward` (the eager forward again); returns the model."""
    state = getattr(model, "_vps_compiled", None)
    if state is None:
        raise ValueError("this model's forward is not compiled by vps")
    model.forward = state[1]
    del model._vps_compiled
    return model


@contextlib.contextmanager
def recompile_limit(limit: int) -> Iterator[None]:
    """Raise dynamo's per-function recompilation limit for the duration (several compiled variants of one
    model class share the forward's code object, and each shape / variant is one cache entry)."""
    import torch._dynamo.config as dynamo_config

    before = dynamo_config.recompile_limit
    dynamo_config.recompile_limit = max(before, limit)
    try:
        yield
    finally:
        dynamo_config.recompile_limit = before


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far (its ``unique_graphs`` counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
