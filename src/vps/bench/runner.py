"""`run_benchmark`: the unpatched model and every VPS config, timed in one process (method in `vps.bench`)."""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import gc
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..compiling import CompileClock, cold_compiles, compile_forward, compiled_graphs, recompile_limit
from ..config import VPSConfig
from ..patching import is_patched, patch, patched, reuse_selection
from .fingerprint import code_fingerprint, loadavg, machine_info, model_info
from .memory import cuda_peak, memory_method, run_probe
from .presets import is_floor, make_config, resolve_configs
from .settings import BenchSettings, Workload
from .timing import make_inputs, time_decode, time_generate, time_prefill

__all__ = ["SCHEMA", "run_benchmark"]

SCHEMA = "vps-bench/1"

COMPILE_WARMUP_LIMIT = 3  # extra warm-up calls per variant while its calls still compile

Samples = dict[str | None, list[float]]  # seconds per variant (None = the unpatched model), one per round


@dataclass
class _Variants:
    """The unpatched model (``None``) and each config; `run` patches afresh per run and ticks the progress bar.

    With ``compile_mode`` every variant is its own copy of the model, patched once and compiled once
    (`vps.compiling.compile_forward`), so switching variants between rounds never recompiles. Each
    compiled run's compile time is added to `compile_s` (warm-up runs) or `timed_compile_s` (timed
    runs: a recompilation there inflates a timed figure, and the report says so).
    """

    model: nn.Module
    built: dict[str, VPSConfig]
    floors: set[str]
    bar: Any
    compile_mode: str | None = None
    names: list[str | None] = field(init=False)
    compile_s: dict[str | None, float] = field(init=False, default_factory=dict)
    timed_compile_s: dict[str | None, float] = field(init=False, default_factory=dict)
    last_compilations: int = field(init=False, default=0)  # compilations of the last compiled run
    _compiled: dict[str | None, nn.Module] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.names = [None, *self.built]
        self.compile_s = dict.fromkeys(self.names, 0.0)
        self.timed_compile_s = dict.fromkeys(self.names, 0.0)

    def run(self, name: str | None, fn: Callable[[nn.Module], Any], timed: bool = False) -> Any:
        """``fn(model)`` on the unpatched model or on the model patched with config ``name`` (``timed``: a
        timed round, whose compile time is kept apart from the warm-up's)."""
        try:
            if self.compile_mode is not None:
                model = self._compiled_variant(name)
                with CompileClock() as clock:
                    out = self._run_on(model, name, fn)
                (self.timed_compile_s if timed else self.compile_s)[name] += clock.seconds
                self.last_compilations = clock.compilations
                return out
            with patched(self.model, self.built[name]) if name is not None else contextlib.nullcontext():
                return self._run_on(self.model, name, fn)
        finally:
            self.bar.update(1)

    def _run_on(self, model: nn.Module, name: str | None, fn: Callable[[nn.Module], Any]) -> Any:
        if name in self.floors:
            fn(model)  # untimed: builds the plans the timed run reuses
            gc.collect()
            with reuse_selection(model):
                return fn(model)
        gc.collect()
        return fn(model)

    def _compiled_variant(self, name: str | None) -> nn.Module:
        model = self._compiled.get(name)
        if model is None:
            model = copy.deepcopy(self.model)
            if name is not None:
                patch(model, self.built[name])
            assert self.compile_mode is not None
            model = self._compiled[name] = compile_forward(model, self.compile_mode)
        return model


# -- timing -------------------------------------------------------------------------------------------
def _timed_call(model: nn.Module, w: Workload, seed: int, static: bool) -> Callable[[nn.Module], float]:
    """The timed call of one workload; its inputs are made once, so every variant and round sees the same ids.

    ``static``: decode into a preallocated cache (compiled runs: one graph replayed per step).
    """
    ids, mask = make_inputs(model, w.batch, w.tokens, seed)
    if w.kind == "prefill":
        return lambda m: time_prefill(m, ids, mask)
    timer = time_generate if w.kind == "generate" else time_decode
    return lambda m: timer(m, ids, mask, w.new_tokens, static)


def _time_workload(variants: _Variants, w: Workload, settings: BenchSettings, load_samples: list[float]) -> Samples:
    """Warm-up runs, then ``w.repeats`` rounds in which every variant runs once; appends the 1-min load per run."""
    variants.bar.set_postfix_str(w.label)
    fn = _timed_call(variants.model, w, settings.seed, static=settings.compile is not None)
    names = variants.names
    for _ in range(settings.warmup):
        for v in names:
            variants.run(v, fn)
            # Compiled: warm up until a call compiles nothing, so no timed round pays a compilation. A
            # patched model's first forward (no plan yet) and its later ones trace differently, so the
            # second call can recompile. Bounded: a variant that keeps recompiling shows in the report.
            extra = 0
            while settings.compile is not None and variants.last_compilations and extra < COMPILE_WARMUP_LIMIT:
                variants.run(v, fn)
                extra += 1
    per: Samples = {v: [] for v in names}
    for r in range(w.repeats):
        k = r % len(names)
        for v in names[k:] + names[:k]:  # rotate the order round by round
            load = loadavg()
            if load:
                load_samples.append(load[0])
            per[v].append(variants.run(v, fn, timed=True))
    return per


# -- memory -------------------------------------------------------------------------------------------
def _variant_memory(variants: _Variants, name: str | None, overrides: dict[str, Any] | None,
                    settings: BenchSettings, device: torch.device, model_spec: dict[str, Any] | None,
                    probe_timeout: float) -> dict[str, Any]:
    shapes = list(settings.prefill_shapes)
    if device.type == "cuda":
        return variants.run(name, lambda m: cuda_peak(m, shapes, settings.seed, device))
    spec = dict(model_spec or {}, overrides=overrides, shapes=shapes, seed=settings.seed,
                threads=torch.get_num_threads())
    mem = run_probe(spec, probe_timeout)
    variants.bar.update(1)
    return mem


def _measure_memory(variants: _Variants, cfgs: dict[str, dict[str, Any]], settings: BenchSettings,
                    device: torch.device, model_spec: dict[str, Any] | None,
                    probe_timeout: float) -> tuple[dict[str | None, dict[str, Any]], str | None]:
    """Peak memory of every variant but the floors -> ({variant: figures}, the first error or None).

    A floor runs SK's plans, so its memory is SK's. The first failure stops the measurement.
    """
    variants.bar.set_postfix_str("peak memory")
    memory: dict[str | None, dict[str, Any]] = {}
    for v in variants.names:
        if v in variants.floors:
            continue
        try:
            memory[v] = _variant_memory(variants, v, None if v is None else cfgs[v], settings, device, model_spec,
                                        probe_timeout)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            return memory, str(exc)
    return memory, None


# -- the result ---------------------------------------------------------------------------------------
def _summary(samples: list[float]) -> dict[str, Any]:
    return {"median_s": statistics.median(samples), "min_s": min(samples), "max_s": max(samples),
            "samples_s": samples}


def _base_workloads(workloads: list[Workload], samples: dict[str, Samples]) -> dict[str, dict[str, Any]]:
    base = {w.key: _summary(samples[w.key][None]) for w in workloads}
    for w in workloads:
        if w.per_token:
            base[w.key]["tokens_per_s"] = w.batch / base[w.key]["median_s"]
    return base


def _workload_entry(w: Workload, vps_s: list[float], base_s: list[float], base_median: float,
                    target: float | None) -> dict[str, Any]:
    """One config's figures on one workload: its summary, both ratios to base, and the target verdict."""
    s = _summary(vps_s)
    s["ratio"] = s["median_s"] / base_median
    s["paired_ratio"] = statistics.median(v / b for v, b in zip(vps_s, base_s, strict=True))
    if w.per_token:
        s["tokens_per_s"] = w.batch / s["median_s"]
    s["target"] = target
    s["pass"] = None if target is None else bool(s["ratio"] <= target)
    return s


def _memory_entry(mem: dict[str, Any] | None, base_mem: dict[str, Any] | None,
                  target: float | None) -> dict[str, Any] | None:
    """A config's memory figures plus their ratios to base and the target verdict (as is where either is missing;
    no verdict without a target)."""
    if mem is None or base_mem is None:
        return mem
    mem = dict(mem, ratio=mem["peak_mb"] / base_mem["peak_mb"],
               workload_ratio=mem["workload_mb"] / base_mem["workload_mb"] if base_mem["workload_mb"] > 0 else None,
               target=target)
    mem["pass"] = None if target is None else bool(mem["ratio"] <= target)
    return mem


def _config_entry(name: str, cfg: VPSConfig, overrides: dict[str, Any], floor: bool, workloads: list[Workload],
                  samples: dict[str, Samples], base: dict[str, dict[str, Any]],
                  memory: dict[str | None, dict[str, Any]], memory_target: float | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"overrides": overrides, "config": cfg.to_dict(), "plan_reuse": floor, "workloads": {}}
    for w in workloads:
        target = None if floor else w.target_for(cfg)
        entry["workloads"][w.key] = _workload_entry(w, samples[w.key][name], samples[w.key][None],
                                                    base[w.key]["median_s"], target)
    entry["memory"] = _memory_entry(memory.get(name), memory.get(None), memory_target)
    return entry


def _compile_entry(variants: _Variants, settings: BenchSettings, graphs: int, cold: bool) -> dict[str, Any]:
    """How the variants were compiled, and each one's compile time (warm-up rounds; timed rounds apart)
    with its ratio to the unpatched model's; ``cold``: compiled with the on-disk caches off."""
    base = variants.compile_s[None]
    return {"mode": settings.compile, "fullgraph": True, "graphs": graphs, "cold": cold,
            "cache": "static", "base_compile_s": base, "timed_base_compile_s": variants.timed_compile_s[None],
            "configs": {name: {"compile_s": variants.compile_s[name],
                               "ratio": variants.compile_s[name] / base if base > 0 else None,
                               "timed_compile_s": variants.timed_compile_s[name]}
                        for name in variants.built}}


def _load_info(load_start: list[float] | None, load_samples: list[float]) -> dict[str, Any]:
    """The machine's load average at the start and the end, and the 1-min load seen before each timed run."""
    info: dict[str, Any] = {"loadavg_start": load_start, "loadavg_end": loadavg()}
    if load_samples:
        info["load_1m_during"] = {"min": min(load_samples), "median": statistics.median(load_samples),
                                  "max": max(load_samples)}
    return info


def run_benchmark(
    model: nn.Module,
    configs: str | Iterable[str] | dict[str, dict[str, Any]] | None = None,
    settings: BenchSettings | None = None,
    *,
    model_spec: dict[str, Any] | None = None,
    progress: bool = True,
    probe_timeout: float = 1800.0,
) -> dict[str, Any]:
    """Measure base and every VPS config on ``model``; returns a JSON-ready dict (see `vps.bench`).

    ``configs``: names/specs (see `parse_config_spec`) or a ready {name: overrides} dict.
    ``model_spec``: how a fresh process loads the same model (``{"model", "dtype", "device"}`` for
    `vps.load_model`, plus an optional display ``"label"``); needed for the CPU memory figures, which
    are skipped without it.
    """
    from tqdm import tqdm

    settings = settings if settings is not None else BenchSettings()
    settings.validate()
    if is_patched(model):
        raise ValueError("run_benchmark needs the unpatched model (it patches and unpatches by itself)")
    cfgs = configs if isinstance(configs, dict) else resolve_configs(configs)
    built = {name: make_config(ov) for name, ov in cfgs.items()}
    model.eval()
    device = next(model.parameters()).device
    workloads = settings.workloads()
    floors = {name for name in built if is_floor(name)}
    t_start = time.perf_counter()
    load_start = loadavg()
    code = code_fingerprint()  # taken now: the source the timed runs execute (probes re-import it later)
    load_samples: list[float] = []

    # CPU memory is measured in a fresh process that runs eagerly: not the compiled model's figures.
    do_memory = settings.memory and (device.type == "cuda" or (model_spec is not None and not settings.compile))
    n_variants = 1 + len(built)
    steps = sum((settings.warmup + w.repeats) * n_variants for w in workloads)
    steps += n_variants - len(floors) if do_memory else 0
    bar = tqdm(total=steps, desc="vps bench", unit="run", disable=not progress, file=sys.stderr, leave=False)
    variants = _Variants(model, built, floors, bar, settings.compile)
    graphs_before = compiled_graphs() if settings.compile else 0

    samples: dict[str, Samples] = {}
    memory: dict[str | None, dict[str, Any]] = {}
    memory_error = None
    # Each run starts after a garbage collection; freezing what exists now (model, libraries) keeps
    # those collections cheap. Automatic collection stays on while timing, as in real use.
    gc.collect()
    gc.freeze()
    try:
        with contextlib.ExitStack() as stack:
            cold = None
            if settings.compile:
                stack.enter_context(recompile_limit(64))
                cold = stack.enter_context(cold_compiles())
            for w in workloads:
                samples[w.key] = _time_workload(variants, w, settings, load_samples)
            if do_memory:
                memory, memory_error = _measure_memory(variants, cfgs, settings, device, model_spec, probe_timeout)
    finally:
        bar.close()
        gc.unfreeze()

    base = _base_workloads(workloads, samples)
    label = (model_spec or {}).get("label") or (model_spec or {}).get("model")
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(model),
        "code": code,
        "model": model_info(model, label),
        "settings": asdict(settings),
        "workloads": [dict(asdict(w), key=w.key, label=w.label) for w in workloads],
        "memory_method": memory_method(device) if do_memory else None,
        "memory_skipped": None if do_memory else (
            "disabled" if not settings.memory
            else "CPU memory is measured in an eager subprocess: run without --compile for it" if settings.compile
            else "CPU memory needs a model_spec (a model a subprocess can load)"),
        "compile": (None if not settings.compile
                    else _compile_entry(variants, settings, compiled_graphs() - graphs_before, bool(cold))),
        "memory_error": memory_error if do_memory else None,
        "base": {"workloads": base, "memory": memory.get(None)},
        "configs": {name: _config_entry(name, cfg, cfgs[name], name in floors, workloads, samples, base, memory,
                                        settings.memory_target)
                    for name, cfg in built.items()},
    }
    result["machine"].update(_load_info(load_start, load_samples))
    result["wall_s"] = time.perf_counter() - t_start
    return result
