"""``torch.compile`` for a (patched) model's forward, as `vps generate --compile` and `vps bench --compile` use it.

The patched forward traces as one graph with no breaks in prefill and decode (tests/core/test_compile.py),
so the whole forward is compiled with ``fullgraph=True``: a break would be a regression and fails
loudly instead of silently running part of the model eagerly. The model-level hooks that read the
attention mask and the next-token entropy run around the compiled forward, eagerly.

`CompileClock` measures compile time. Regional compilation (``nn.Module.compile`` per decoder block)
is not offered: measured on a tiny 4-block Llama (issue #34), dynamo compiles every block anew (a
KV cache is guarded per block through ``cache.layers[layer_idx]``, and a patched block 0 sees an
empty per-forward mask cache where later blocks see it filled), so it saves no compile time. What does
repeat exactly is each patched layer's plan: traced in a whole forward, it is one nested compile region
(`vps.plan_region`), compiled once per shape class instead of once per layer. `cold_compiles` turns
the on-disk caches off so that compile times compare.

`compile_plans` is the regional alternative for an eager model (issue #34, item 2): only the plan
function of the patched layers (`vps.planning.plan_tensors`: statistics, ranking, policy, selection, clip
and Q) is compiled, with ``dynamic=True``, once per shape class, and every layer calls the same compiled
code, so on a GPU a plan runs as a few fused kernels instead of ~40 launches. It is opt-in; the eager
path stays the reference and the default.

Importing this module does not import torch (the command-line parser reads `COMPILE_MODES`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
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


@contextlib.contextmanager
def cold_compiles() -> Iterator[bool]:
    """Inductor's and dynamo's on-disk caches off for the duration, so every compilation is a cold one and
    compile times compare: with caches on, a graph compiled by an earlier process (the unpatched model's,
    typically) loads in seconds while a new one compiles in minutes. Yields whether caches could be
    turned off (False on a torch without the switch: the times may then include cache hits)."""
    import torch._inductor.config as inductor_config

    if not hasattr(inductor_config, "force_disable_caches"):
        yield False
        return
    before = inductor_config.force_disable_caches
    inductor_config.force_disable_caches = True
    try:
        yield True
    finally:
        inductor_config.force_disable_caches = before


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far (its ``unique_graphs`` counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class PlanCompileError(RuntimeError):
    """The compiled plan region (`vps.planning.plan_tensors` under `compile_plans`) failed to compile or run."""


# Graphs dynamo may keep for the plan function (its default, 8, is per code object and all layers share
# this one): one per shape class (d_in x d_out of each projection kind, batch 1 or more) and per variant
# (input ranking shared or not, padding, entropy, captured gradient / SC, autograd through the gain).
PLAN_RECOMPILE_LIMIT = 64

# (backend, mode) -> the wrapped compiled plan function. One per process, shared by every layer and model:
# dynamo keys its cache on plan_tensors' code object, so all layers reuse the graphs of their shape class.
_PLAN_FUNCTIONS: dict[tuple[str | Callable[..., Any], str | None], Callable[..., Any]] = {}


def compiled_plan_function(backend: str | Callable[..., Any] = "inductor",
                           mode: str | None = None) -> Callable[..., Any]:
    """`vps.planning.plan_tensors` compiled with ``dynamic=True`` and ``fullgraph=True`` for ``backend``.

    ``fullgraph=True`` makes a graph break, or dynamo's recompile limit, an error rather than a silent
    eager fallback; any failure is raised as a `PlanCompileError` that names the region.
    """
    import torch

    from .planning import plan_tensors

    if mode is not None:
        check_mode(mode, "mode")
    key = (backend, None if mode == "default" else mode)
    fn = _PLAN_FUNCTIONS.get(key)
    if fn is not None:
        return fn
    import torch._dynamo.config as dynamo_config

    compiled = torch.compile(plan_tensors, backend=backend, mode=key[1], dynamic=True, fullgraph=True)

    def compiled_plan(*args: Any) -> Any:
        if torch.compiler.is_compiling():
            # Inside a forward compiled as a whole (`compile_forward`) the region is traced into that graph.
            return plan_tensors(*args)
        # The limit is read when a call misses dynamo's cache, so raising it around the call alone leaves
        # every other compiled function in the process at the user's limit.
        before = dynamo_config.recompile_limit
        if before < PLAN_RECOMPILE_LIMIT:
            dynamo_config.recompile_limit = PLAN_RECOMPILE_LIMIT
        try:
            return compiled(*args)
        except Exception as e:  # a compile or run failure of the region: say which region, never run eagerly
            raise PlanCompileError(f"vps.compile_plans: the compiled plan region vps.planning.plan_tensors "
                                   f"(backend={backend!r}, mode={key[1]!r}) failed: {type(e).__name__}: {e}") from e
        finally:
            if before < PLAN_RECOMPILE_LIMIT:
                dynamo_config.recompile_limit = before

    compiled_plan.__wrapped__ = plan_tensors  # type: ignore[attr-defined]
    _PLAN_FUNCTIONS[key] = compiled_plan
    return compiled_plan


def compile_plans(model: Any, enabled: bool = True, backend: str | Callable[..., Any] = "inductor",
                  mode: str | None = None) -> Any:
    """Switch every `VPSLinear` of a patched ``model`` to the compiled plan function (``enabled=True``) or
    back to the eager one (``enabled=False``, the default state after `vps.patch`); returns the model.

    Regional: only the plan (statistics through Q) is compiled; the rest of the forward stays eager.
    The first prefill of each shape class compiles (``dynamic=True``, so prompt lengths and batch sizes
    above 1 share a graph); every layer reuses it. Raises a `PlanCompileError` naming the region when
    compiling it fails, instead of running it eagerly.
    """
    from .patching import vps_layers

    layers = vps_layers(model)
    if not layers:
        raise ValueError("compile_plans: the model has no VPS layers; vps.patch it first")
    if enabled:
        fn = compiled_plan_function(backend, mode)
        for layer in layers.values():
            layer.plan_fn = fn
    else:
        from .planning import plan_tensors

        for layer in layers.values():
            layer.plan_fn = plan_tensors
    return model


def uncompile_plans(model: Any) -> Any:
    """The eager plan function again for every `VPSLinear` of ``model`` (= ``compile_plans(model, False)``)."""
    return compile_plans(model, enabled=False)


def plans_compiled(model: Any) -> bool:
    """Whether the VPS layers of ``model`` run the compiled plan function."""
    from .patching import vps_layers
    from .planning import plan_tensors

    return any(layer.plan_fn is not plan_tensors for layer in vps_layers(model).values())
