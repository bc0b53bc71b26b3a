"""Overhead of VPS against the unpatched model: prefill time, greedy decode time per token, peak memory.

Everything that is timed runs in one process. For every workload the unpatched model and each VPS
configuration are run once untimed (warm-up), then ``repeats`` rounds follow; within a round every
variant (base and each config) runs once, in an order that rotates from round to round, so a burst
of load from elsewhere on the machine hits base and VPS alike. A variant's figure is the median of
its rounds; a ratio is ``median(vps) / median(base)``, and ``paired_ratio`` (the median over
rounds of vps / base within the same round) is reported beside it as a check on the noise.

Patching and unpatching are never timed: before each VPS run the model is patched afresh (so no
state leaks from one run into the next) and unpatched afterwards.

Workloads (the defaults; ``BenchSettings.quick_settings()`` shrinks them for smoke tests):

- prefill: batch 1 x 512 and batch 8 x 128 random token ids (fixed seed, all-ones attention
  mask), one ``model(ids, attention_mask=..., use_cache=True, logits_to_keep=1)`` forward, i.e.
  what ``generate()`` does before its first token;
- greedy decode: batch 1 and batch 8, a 32-token prompt (its prefill untimed), then 64 single-token
  forwards with the KV cache and an argmax; the figure is seconds per decode step (per token);
- ``generate()``: batch 1 and batch 8, the same 32-token prompt, one ``model.generate`` call with
  greedy search and exactly 64 new tokens (``min_new_tokens`` keeps an end-of-sequence token from
  stopping it); the figure is the call's seconds per new token, its prefill included. This is what
  users run, so it catches what a hand-written loop cannot (the loop above names the cache argument
  itself; ``generate()`` uses whatever the installed transformers passes);
- peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the prefill workloads, in process;
  on CPU the process peak RSS (``VmHWM``) of a fresh subprocess per variant that loads the
  model, patches it (or not) and runs the prefill workloads (``python -m vps.bench --memory-probe``).

The ``floor`` configuration is SK with its plans built by an untimed run of the same workload and then
reused (`vps.reuse_selection`): the timed run adds only the rank-2 term itself — one gather and one
``baddbmm`` per layer — to the base forward. It is what any dynamic selection costs at least, measured
in the same run as the rest (no target applies to it, and it has no memory figure of its own).

`run_benchmark` returns a JSON-ready dict; `format_report` renders it as text.

Modules: `presets` (named configs and config specs), `settings` (workloads, sizes, targets), `timing`
(single timed calls), `memory` (peak-memory probes and the probe subprocess's entry point),
`fingerprint` (code, machine and model identity), `runner` (`run_benchmark`), `report`
(`format_report`), `plot` (the ratio chart; ``python -m vps.bench.plot``), `profiling`
(``vps bench --profile``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

# Public name -> the submodule that defines it. Loaded on first use (PEP 562), like `vps` itself: the
# parser of `vps bench` reads the presets without loading torch; ``python -m vps.bench.plot`` runs a module
# nothing imported before (runpy warns otherwise); and the memory probe subprocess (``python -m
# vps.bench``) loads only what the probe needs into the RSS it measures.
_EXPORTS = {
    "DEFAULT_CONFIGS": "presets", "PLAN_REUSE_PRESETS": "presets", "PRESETS": "presets", "is_floor": "presets",
    "make_config": "presets", "parse_config_spec": "presets", "resolve_configs": "presets",
    "TARGET_DECODE_B1": "settings", "TARGET_MEMORY": "settings", "TARGET_PREFILL_BATCH": "settings",
    "TARGET_PREFILL_LONG": "settings", "WORKLOAD_KINDS": "settings", "BenchSettings": "settings",
    "Workload": "settings",
    "forward_kwargs": "timing", "make_inputs": "timing", "sync_device": "timing", "time_decode": "timing",
    "time_generate": "timing", "time_prefill": "timing",
    "MALLOC_MMAP_THRESHOLD": "memory", "cuda_peak": "memory", "memory_method": "memory", "memory_probe": "memory",
    "run_memory_workload": "memory", "run_probe": "memory",
    "code_fingerprint": "fingerprint", "loadavg": "fingerprint", "machine_info": "fingerprint",
    "model_info": "fingerprint",
    "SCHEMA": "runner", "run_benchmark": "runner",
    "format_report": "report",
    "plot_benchmark": "plot",
    "profile_patched": "profiling", "vps_breakdown": "profiling",
}

__all__ = [  # the keys of _EXPORTS, spelled out for linters
    "DEFAULT_CONFIGS", "MALLOC_MMAP_THRESHOLD", "PLAN_REUSE_PRESETS", "PRESETS", "SCHEMA", "TARGET_DECODE_B1",
    "TARGET_MEMORY", "TARGET_PREFILL_BATCH", "TARGET_PREFILL_LONG", "WORKLOAD_KINDS", "BenchSettings", "Workload",
    "code_fingerprint", "cuda_peak", "format_report", "forward_kwargs", "is_floor", "loadavg", "machine_info",
    "make_config", "make_inputs", "memory_method", "memory_probe", "model_info", "parse_config_spec",
    "plot_benchmark", "profile_patched", "resolve_configs", "run_benchmark", "run_memory_workload", "run_probe",
    "sync_device", "time_decode", "time_generate", "time_prefill", "vps_breakdown",
]


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)


if TYPE_CHECKING:  # what the names are, for type checkers and editors
    from .fingerprint import code_fingerprint, loadavg, machine_info, model_info
    from .memory import (
        MALLOC_MMAP_THRESHOLD,
        cuda_peak,
        memory_method,
        memory_probe,
        run_memory_workload,
        run_probe,
    )
    from .plot import plot_benchmark
    from .presets import (
        DEFAULT_CONFIGS,
        PLAN_REUSE_PRESETS,
        PRESETS,
        is_floor,
        make_config,
        parse_config_spec,
        resolve_configs,
    )
    from .profiling import profile_patched, vps_breakdown
    from .report import format_report
    from .runner import SCHEMA, run_benchmark
    from .settings import (
        TARGET_DECODE_B1,
        TARGET_MEMORY,
        TARGET_PREFILL_BATCH,
        TARGET_PREFILL_LONG,
        WORKLOAD_KINDS,
        BenchSettings,
        Workload,
    )
    from .timing import forward_kwargs, make_inputs, sync_device, time_decode, time_generate, time_prefill
