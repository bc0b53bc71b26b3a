"""``torch.compile`` for a (patched) model's forward, as `vps generate --compile` and `vps bench --compile` use it.

The patched forward traces as one graph with no breaks in prefill and decode (tests/test_compile.py),
so the whole forward is compiled with ``fullgraph=True``: a break would be a regression and fails
loudly instead of silently running part of the model eagerly. The model-level hooks that read the
attention mask and the next-token entropy run around the compiled forward, eagerly.

`CompileClock` measures compile time. Regional compilation (``nn.Module.compile`` per decoder block)
is not offered: measured on a tiny 4-block Llama (issue #34), dynamo compiles every block anew (a
KV cache is guarded per block through ``cache.layers[layer_idx]``, and a patched block 0 sees an
empty per-forward mask cache where later blocks see it filled), so it saves no compile time.

Importing this module does not import torch (the command-line parser reads `COMPILE_MODES`).
"""

from __future__ import annotations

import contextlib
import time
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


class CompileClock:
    """Wall time spent compiling while active: from dynamo's compile-start to its compile-end callbacks.

    Covers tracing, AOT autograd, inductor's code generation and, in ``reduce-overhead`` mode, the
    recording of CUDA graphs (which happens at run time), and nothing else, so a timed call minus
    ``seconds`` is the call without its compilation. Use as a context manager; nested compilations
    count once (dynamo reports the outermost start and end).
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self.compilations = 0
        self._started: float | None = None

    def _start(self, _args: Any) -> None:
        self._started = time.perf_counter()

    def _end(self, _args: Any) -> None:
        if self._started is not None:
            self.seconds += time.perf_counter() - self._started
            self.compilations += 1
            self._started = None

    def __enter__(self) -> CompileClock:
        from torch._dynamo.callback import callback_handler

        callback_handler.register_start_callback(self._start)
        callback_handler.register_end_callback(self._end)
        return self

    def __exit__(self, *exc: object) -> None:
        from torch._dynamo.callback import callback_handler

        callback_handler.remove_start_callback(self._start)
        callback_handler.remove_end_callback(self._end)


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
