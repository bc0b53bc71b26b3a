"""Where a patched forward spends its time: ``vps bench --profile``.

`profile_patched` profiles one patched prefill and one patched decode step with torch.profiler and
cProfile, and splits the prefill into the VPS parts (statistics, the rest of plan building, applying
the perturbation) against the whole forward, so a reader sees what bounds the overhead.
"""

from __future__ import annotations

import contextlib
import cProfile
import io
import pstats
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from .. import activation_stats as stats_mod
from .. import layer as layer_mod
from ..kv_cache import cache_argument, output_cache
from ..patching import patched
from .presets import make_config
from .settings import BenchSettings
from .timing import forward_kwargs, make_inputs, sync_device

__all__ = ["profile_patched", "vps_breakdown"]

# Labels of the VPS parts in a profile; "statistics" runs inside "plan".
PARTS = {"vps::plan": "plan building (selection, policy, clip, Q)", "vps::statistics": "  of which statistics",
         "vps::apply": "applying the perturbation"}


@contextlib.contextmanager
def _labelled_parts() -> Iterator[None]:
    """Wrap the VPS hot-path functions in record_function labels while profiling (and only then)."""
    def wrap(fn: Any, label: str) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            with record_function(label):
                return fn(*args, **kwargs)
        return wrapped

    # Patched through setattr on the module and the class: the profiler swaps these functions for the duration
    # of the block only, which static typing cannot express.
    cls: Any = layer_mod.VPSLinear
    mod: Any = stats_mod
    saved = {"_build_plan": cls._build_plan, "_apply_plan": cls._apply_plan,
             "input_scores": mod.input_scores, "output_scores": mod.output_scores}
    cls._build_plan = wrap(saved["_build_plan"], "vps::plan")
    cls._apply_plan = wrap(saved["_apply_plan"], "vps::apply")
    mod.input_scores = wrap(saved["input_scores"], "vps::statistics")
    mod.output_scores = wrap(saved["output_scores"], "vps::statistics")
    try:
        yield
    finally:
        cls._build_plan, cls._apply_plan = saved["_build_plan"], saved["_apply_plan"]
        mod.input_scores, mod.output_scores = saved["input_scores"], saved["output_scores"]


def vps_breakdown(prof: Any, total_us: float) -> str:
    """Milliseconds and share of the forward spent in each VPS part, from a `_labelled_parts` profile."""
    totals = {e.key: e.cpu_time_total for e in prof.key_averages() if e.key in PARTS}
    lines = [f"whole forward: {total_us / 1e3:.1f} ms"]
    for key, label in PARTS.items():
        us = totals.get(key, 0.0)
        lines.append(f"{label}: {us / 1e3:.1f} ms ({100 * us / total_us:.1f}%)")
    return "\n".join(lines)


def profile_patched(model: nn.Module, overrides: dict[str, Any], settings: BenchSettings | None = None,
                    row_limit: int = 15) -> str:
    """Profile ONE patched prefill (the batched shape) and ONE patched decode step (batch 1).

    Returns, for each, the time in the VPS parts against the whole forward, the top ``row_limit`` torch
    ops by self CPU time (torch.profiler) and the top Python functions by self time (cProfile), as
    text. Each profiled call follows one untimed warm-up.
    """
    settings = settings if settings is not None else BenchSettings()
    device = next(model.parameters()).device
    kwargs = forward_kwargs(model)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    b, t = settings.prefill_shapes[-1]
    ids, mask = make_inputs(model, b, t, settings.seed)
    dec_ids, dec_mask = make_inputs(model, settings.decode_batches[0], settings.prompt_tokens, settings.seed)
    sections = []
    with patched(model, make_config(overrides)), torch.no_grad():
        def prefill():
            return model(input_ids=ids, attention_mask=mask, use_cache=True, **kwargs)

        def decode_setup():
            out = model(input_ids=dec_ids, attention_mask=dec_mask, use_cache=True, **kwargs)
            nxt = out.logits[:, -1].argmax(dim=-1, keepdim=True)
            full = torch.ones(dec_ids.shape[0], dec_ids.shape[1] + 1, dtype=dec_mask.dtype, device=device)
            cache = {cache_argument(model): output_cache(out)}
            return lambda: model(input_ids=nxt, attention_mask=full, use_cache=True, **cache, **kwargs)

        for label, make in ((f"patched prefill {b}x{t}", lambda: prefill),
                            (f"patched decode step, batch {dec_ids.shape[0]}", decode_setup)):
            make()()  # warm-up; every measured call gets a fresh step (for decode: a fresh KV cache)
            step = make()
            with _labelled_parts(), profile(activities=activities) as prof:
                with record_function("vps::forward"):
                    step()
                sync_device(device)
            whole = next(e.cpu_time_total for e in prof.key_averages() if e.key == "vps::forward")
            parts = vps_breakdown(prof, whole)
            ops = prof.key_averages().table(sort_by=sort_by, row_limit=row_limit)
            step = make()
            pr = cProfile.Profile()
            pr.enable()
            step()
            sync_device(device)
            pr.disable()
            buf = io.StringIO()
            pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(row_limit)
            py = "\n".join(ln for ln in buf.getvalue().splitlines() if ln.strip())
            sections.append(f"=== {label}: VPS parts (torch.profiler, CPU time) ===\n{parts}\n"
                            f"=== {label}: torch ops by self time ===\n{ops}\n"
                            f"=== {label}: Python functions by self time (cProfile) ===\n{py}\n")
    return "\n".join(sections)
