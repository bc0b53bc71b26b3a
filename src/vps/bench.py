"""Overhead of VPS against the unpatched model: prefill time, greedy decode time per token, peak memory.

Everything that is timed runs in one process. For every workload the unpatched model and each VPS
configuration are run once untimed (warm-up), then ``repeats`` rounds follow; within a round every
variant (base and each config) runs once, in an order that rotates from round to round, so a burst
of load from elsewhere on the machine hits base and VPS alike. A variant's figure is the median of
its rounds; a ratio is ``median(vps) / median(base)``, and ``paired_ratio`` (the median over
rounds of vps / base within the same round) is reported beside it as a check on the noise.

Patching and unpatching are never timed: before each VPS run the model is patched afresh (so no
state leaks from one run into the next) and unpatched afterwards.

Workloads (the defaults; ``BenchSettings.quick()`` shrinks them for smoke tests):

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
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .config import VPSConfig
from .kv_cache import cache_argument, forward_accepts, output_cache
from .patching import is_patched, patch, patched, reuse_selection

SCHEMA = "vps-bench/1"
MALLOC_MMAP_THRESHOLD = 128 * 1024  # bytes; see _run_probe

# Named configurations: VPSConfig overrides on top of the seed defaults (rank 2, topk 32, ...).
PRESETS: dict[str, dict[str, Any]] = {
    "sk": {"builder": "sk"},
    "sc": {"builder": "sc"},
    "hybrid": {"builder": "hybrid"},
    "sk-dynamic": {"builder": "sk", "decode_mode": "dynamic"},
    "sc-dynamic": {"builder": "sc", "decode_mode": "dynamic"},
    "hybrid-dynamic": {"builder": "hybrid", "decode_mode": "dynamic"},
    "sk-fixed": {"builder": "sk", "adaptive_rank": False, "adaptive_gamma": False},
    "floor": {"builder": "sk"},  # plans reused from an untimed run: the rank-2 term alone
}
PLAN_REUSE_PRESETS = frozenset({"floor"})
DEFAULT_CONFIGS = ("sk", "sc", "hybrid", "sk-dynamic", "floor")

# The overhead targets of BENCHMARKS.md (ratios to the unpatched model). Prefill targets belong to workload roles, so
# that --quick sizes keep them: the first prefill shape is "one long sequence", the second "a batch".
TARGET_PREFILL_LONG = 1.10  # batch 1 x 512
TARGET_PREFILL_BATCH = 1.05  # batch 8 x 128
TARGET_DECODE_B1 = 1.15  # frozen decode, time per token at batch 1 (the decode loop and generate() alike)
TARGET_MEMORY = 1.02  # peak memory


WORKLOAD_KINDS = ("prefill", "decode", "generate")


# -- settings ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    """One thing to time: a prefill of ``batch x tokens``, or ``new_tokens`` decode steps after a prompt."""

    kind: str  # "prefill" | "decode" | "generate"
    batch: int
    tokens: int  # prefill length, or the decode prompt's length
    new_tokens: int = 0
    repeats: int = 5
    target: float | None = None
    frozen_only: bool = False  # the target applies to decode_mode="frozen" configs only

    @property
    def key(self) -> str:
        return f"prefill_{self.batch}x{self.tokens}" if self.kind == "prefill" else f"{self.kind}_b{self.batch}"

    @property
    def label(self) -> str:
        if self.kind == "prefill":
            return f"prefill {self.batch}x{self.tokens}"
        return f"{'generate()' if self.kind == 'generate' else 'decode'} b{self.batch}"

    @property
    def per_token(self) -> bool:
        """Whether the figure is seconds per new token (and tokens/s is reported beside it)."""
        return self.kind != "prefill"

    def target_for(self, cfg: VPSConfig) -> float | None:
        if self.frozen_only and cfg.decode_mode != "frozen":
            return None
        return self.target


@dataclass
class BenchSettings:
    """Sizes and repeat counts of a benchmark run."""

    prefill_shapes: list[tuple[int, int]] = field(default_factory=lambda: [(1, 512), (8, 128)])
    decode_batches: list[int] = field(default_factory=lambda: [1, 8])
    generate_batches: list[int] = field(default_factory=lambda: [1, 8])
    prompt_tokens: int = 32
    new_tokens: int = 64
    prefill_repeats: int = 5
    decode_repeats: int = 3
    warmup: int = 1
    seed: int = 0
    memory: bool = True
    quick: bool = False
    kinds: tuple[str, ...] = WORKLOAD_KINDS  # which workload kinds run

    @classmethod
    def quick_settings(cls, **overrides: Any) -> BenchSettings:
        """Tiny sizes: for smoke tests and tiny models (positions stay below 64)."""
        values: dict[str, Any] = dict(prefill_shapes=[(1, 32), (2, 16)], decode_batches=[1, 2],
                                      generate_batches=[1, 2], prompt_tokens=8,
                                      new_tokens=4, prefill_repeats=2, decode_repeats=2, warmup=1, quick=True)
        values.update(overrides)
        return cls(**values)

    def validate(self) -> None:
        for name in ("prompt_tokens", "new_tokens", "prefill_repeats", "decode_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        unknown = [k for k in self.kinds if k not in WORKLOAD_KINDS]
        if unknown or not self.kinds:
            raise ValueError(f"workload kinds must be a non-empty subset of {', '.join(WORKLOAD_KINDS)}, "
                             f"got {', '.join(self.kinds) or 'none'}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if any(b < 1 or t < 1 for b, t in self.prefill_shapes) or any(
                b < 1 for b in [*self.decode_batches, *self.generate_batches]):
            raise ValueError("batch sizes and token counts must be >= 1")

    def workloads(self) -> list[Workload]:
        out = []
        for i, (b, t) in enumerate(self.prefill_shapes):
            target = (TARGET_PREFILL_LONG, TARGET_PREFILL_BATCH)[i] if i < 2 else None
            out.append(Workload("prefill", b, t, repeats=self.prefill_repeats, target=target))
        for i, b in enumerate(self.decode_batches):
            out.append(Workload("decode", b, self.prompt_tokens, self.new_tokens, repeats=self.decode_repeats,
                                target=TARGET_DECODE_B1 if i == 0 else None, frozen_only=True))
        for i, b in enumerate(self.generate_batches):
            out.append(Workload("generate", b, self.prompt_tokens, self.new_tokens, repeats=self.decode_repeats,
                                target=TARGET_DECODE_B1 if i == 0 else None, frozen_only=True))
        return [w for w in out if w.kind in self.kinds]


# -- configurations ----------------------------------------------------------------------------------
def parse_config_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"sk"`` or ``"sk:order=2:adaptive_rank=false"`` -> (name, VPSConfig overrides).

    The part before the first ``:`` names a preset (`PRESETS`); each ``key=value`` after it sets a
    VPSConfig field (values are read as JSON where they parse, else as strings).
    """
    name, *pairs = spec.strip().split(":")
    if name not in PRESETS:
        raise ValueError(f"unknown bench config {name!r}; known: {', '.join(PRESETS)} "
                         "(add overrides as name:field=value:...)")
    overrides = dict(PRESETS[name])
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"bad override {pair!r} in bench config {spec!r}; expected field=value")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        overrides[key] = value
    return spec.strip(), overrides


def is_floor(name: str) -> bool:
    """Whether a config name (a spec as given) is a plan-reuse floor preset."""
    return name.split(":")[0].strip() in PLAN_REUSE_PRESETS


def make_config(overrides: dict[str, Any]) -> VPSConfig:
    """Seed defaults plus ``overrides`` (a larger rank widens topk to match), validated."""
    cfg = VPSConfig()
    overrides = dict(overrides)
    if "rank" in overrides and "topk" not in overrides and overrides["rank"] > cfg.topk:
        overrides["topk"] = overrides["rank"]
    return cfg.replace(**overrides)


def resolve_configs(specs: str | Iterable[str] | None) -> dict[str, dict[str, Any]]:
    """Config specs (a comma-separated string or a list) -> {name: overrides}; validates each config."""
    if specs is None:
        specs = DEFAULT_CONFIGS
    if isinstance(specs, str):
        specs = [s for s in specs.split(",") if s.strip()]
    out: dict[str, dict[str, Any]] = {}
    for spec in specs:
        name, overrides = parse_config_spec(spec)
        make_config(overrides)  # raise now, naming the bad field, rather than halfway through a run
        out[name] = overrides
    if not out:
        raise ValueError("no bench config given")
    return out


# -- single measurements -----------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _forward_kwargs(model: nn.Module) -> dict[str, Any]:
    return {"logits_to_keep": 1} if forward_accepts(model, "logits_to_keep") else {}


def make_inputs(model: nn.Module, batch: int, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids (fixed seed, ids >= 3 to stay clear of the usual special tokens) and an all-ones mask."""
    device = next(model.parameters()).device
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    vocab = int(cfg.vocab_size)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + batch * 1009 + tokens)
    ids = torch.randint(min(3, vocab - 1), vocab, (batch, tokens), generator=gen).to(device)
    return ids, torch.ones_like(ids)


def time_prefill(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> float:
    """Seconds of one prefill forward (last position's logits only, a fresh KV cache)."""
    device = ids.device
    kwargs = _forward_kwargs(model)
    with torch.no_grad():
        _sync(device)
        start = time.perf_counter()
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, **kwargs)
        _sync(device)
        took = time.perf_counter() - start
    del out
    return took


def time_decode(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int) -> float:
    """Seconds per greedy decode step: an untimed prefill, then ``new_tokens`` cached single-token forwards.

    Every step runs (an end-of-sequence token does not stop the loop), so the work is fixed.
    """
    device = ids.device
    kwargs = _forward_kwargs(model)
    cache_kw = cache_argument(model)
    b, t = ids.shape
    full_mask = torch.ones(b, t + new_tokens, dtype=mask.dtype, device=device)
    full_mask[:, :t] = mask
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, **kwargs)
        past = output_cache(out)
        nxt = out.logits[:, -1].argmax(dim=-1, keepdim=True)
        del out
        _sync(device)
        start = time.perf_counter()
        for i in range(new_tokens):
            out = model(input_ids=nxt, attention_mask=full_mask[:, : t + i + 1], use_cache=True,
                        **{cache_kw: past}, **kwargs)
            past = output_cache(out)
            nxt = out.logits[:, -1].argmax(dim=-1, keepdim=True)
        _sync(device)
        took = time.perf_counter() - start
    del out, past
    return took / new_tokens


def time_generate(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int) -> float:
    """Seconds per new token of one greedy ``model.generate`` call producing exactly ``new_tokens`` tokens."""
    device = ids.device
    pad = getattr(model.generation_config, "pad_token_id", None)
    if pad is None:
        pad = getattr(model.config, "pad_token_id", None)
    with torch.no_grad():
        _sync(device)
        start = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, pad_token_id=0 if pad is None else pad)
        _sync(device)
        took = time.perf_counter() - start
    if out.shape[1] != ids.shape[1] + new_tokens:
        raise RuntimeError(f"generate() made {out.shape[1] - ids.shape[1]} new tokens, expected {new_tokens}")
    return took / new_tokens


def run_memory_workload(model: nn.Module, shapes: Sequence[tuple[int, int]], seed: int) -> None:
    """The prefills whose peak memory is measured (batched shape first, as the probe does)."""
    for b, t in sorted(shapes, key=lambda s: -s[0]):
        ids, mask = make_inputs(model, b, t, seed)
        time_prefill(model, ids, mask)


def _maxrss_mb() -> float:
    """``ru_maxrss`` in MB. Beware: it is floored by the parent's RSS at fork (the kernel carries the forked
    copy's high-water mark across exec), so in a subprocess of a big process it is not this program's own peak."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def _proc_status_mb(field_name: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) / 2**10
    except OSError:
        pass
    return None


def _peak_rss_mb() -> float:
    """This process's own peak RSS: ``VmHWM`` where /proc has it (Linux), else ``ru_maxrss``."""
    hwm = _proc_status_mb("VmHWM")
    return hwm if hwm is not None else _maxrss_mb()


def _reset_peak_rss() -> bool:
    """Reset the process's peak RSS to its current RSS (Linux >= 4.0); False where that is unavailable."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _current_rss_mb() -> float | None:
    return _proc_status_mb("VmRSS")


def memory_probe(spec: dict[str, Any]) -> dict[str, Any]:
    """Body of the ``--memory-probe`` subprocess: load, maybe patch, run the prefills, report peak RSS.

    Loading a checkpoint briefly needs more memory than the loaded model holds, so the peak is reset
    (Linux ``/proc/self/clear_refs``) after loading and patching; the reported ``peak_mb`` is then
    the process peak RSS (``VmHWM``) while the prefills run (weights and runtime included). Without
    the reset (``peak_reset`` false) it is the peak of the whole process, loading included.
    ``ru_maxrss`` is reported too but not used: in a child of the benchmarking process it is floored
    by the parent's RSS at fork time.
    """
    from .models import load_model

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    model, _ = load_model(spec.get("model"), dtype=getattr(torch, spec.get("dtype", "float32")),
                          device=spec.get("device"))
    load_peak = _peak_rss_mb()
    if spec.get("overrides") is not None:
        patch(model, make_config(spec["overrides"]))
    gc.collect()
    reset = _reset_peak_rss()
    before = _current_rss_mb() if reset else _peak_rss_mb()
    run_memory_workload(model, [tuple(s) for s in spec["shapes"]], int(spec.get("seed", 0)))
    peak = _peak_rss_mb()
    return {"peak_mb": peak, "after_setup_mb": before, "workload_mb": peak - (before or peak),
            "load_peak_mb": load_peak, "peak_reset": reset, "ru_maxrss_mb": _maxrss_mb()}


def _run_probe(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    env = dict(os.environ, VPS_QUIET="1", TQDM_DISABLE="1")
    # glibc raises its mmap threshold as large blocks are freed, after which freed tensors stay in the heap
    # and the peak RSS of identical runs wanders by 10-30%. A fixed threshold returns every large tensor
    # to the OS when it is freed, so the peak RSS follows the peak of live memory (repeatable to ~1 MB).
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(MALLOC_MMAP_THRESHOLD))
    proc = subprocess.run([sys.executable, "-m", "vps.bench", "--memory-probe", json.dumps(spec)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"memory probe failed (exit {proc.returncode}): " + " | ".join(tail))
    return json.loads(lines[-1])


def _cuda_peak(model: nn.Module, shapes: Sequence[tuple[int, int]], seed: int, device: torch.device) -> dict:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device) / 2**20
    torch.cuda.reset_peak_memory_stats(device)
    run_memory_workload(model, shapes, seed)
    peak = torch.cuda.max_memory_allocated(device) / 2**20
    return {"peak_mb": peak, "after_setup_mb": before, "workload_mb": peak - before}


# -- the benchmark -------------------------------------------------------------------------------------
def _summary(samples: list[float]) -> dict[str, Any]:
    return {"median_s": statistics.median(samples), "min_s": min(samples), "max_s": max(samples),
            "samples_s": samples}


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def machine_info(model: nn.Module) -> dict[str, Any]:
    import transformers

    from . import __version__

    device = next(model.parameters()).device
    info: dict[str, Any] = {
        "device": str(device), "device_name": platform.processor() or platform.machine(),
        "python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
        "transformers": transformers.__version__, "vps": __version__, "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "hostname": platform.node(),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    return info


def code_fingerprint() -> dict[str, Any]:
    """Which VPS code was measured: a hash of the package's source files and, where available, the git commit."""
    import hashlib
    from pathlib import Path

    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    info: dict[str, Any] = {"source_sha256": digest.hexdigest()[:12], "git_commit": None, "git_dirty": None}
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10)
        if head.returncode == 0:
            info["git_commit"] = head.stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=root, capture_output=True,
                                   text=True, timeout=10)
            info["git_dirty"] = bool(dirty.stdout.strip()) if dirty.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def model_info(model: nn.Module, name: str | None) -> dict[str, Any]:
    p = next(model.parameters())
    return {"name": name or getattr(model.config, "_name_or_path", None) or None, "class": type(model).__name__,
            "model_type": getattr(model.config, "model_type", None),
            "params": sum(x.numel() for x in model.parameters()), "dtype": str(p.dtype).removeprefix("torch.")}


def run_benchmark(
    model: nn.Module,
    configs: str | Iterable[str] | dict[str, dict[str, Any]] | None = None,
    settings: BenchSettings | None = None,
    *,
    model_spec: dict[str, Any] | None = None,
    progress: bool = True,
    probe_timeout: float = 1800.0,
) -> dict[str, Any]:
    """Measure base and every VPS config on ``model``; returns a JSON-ready dict (see the module doc).

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
    variants: list[str | None] = [None, *built]  # None = the unpatched model
    floors = {name for name in built if is_floor(name)}
    t_start = time.perf_counter()
    load_start = _loadavg()
    code = code_fingerprint()  # taken now: the source the timed runs execute (probes re-import it later)
    load_samples: list[float] = []

    do_memory = settings.memory and (device.type == "cuda" or model_spec is not None)
    shapes = list(settings.prefill_shapes)
    steps = sum((settings.warmup + w.repeats) * len(variants) for w in workloads)
    steps += len(variants) - len(floors) if do_memory else 0
    bar = tqdm(total=steps, desc="vps bench", unit="run", disable=not progress, file=sys.stderr, leave=False)

    def run_variant(name: str | None, fn: Callable[[], Any]) -> Any:
        try:
            with patched(model, built[name]) if name is not None else contextlib.nullcontext():
                if name in floors:
                    fn()  # untimed: builds the plans the timed run reuses
                    gc.collect()
                    with reuse_selection(model):
                        return fn()
                gc.collect()
                return fn()
        finally:
            bar.update(1)

    samples: dict[str, dict[str | None, list[float]]] = {}
    # Each run starts after a garbage collection; freezing what exists now (model, libraries) keeps
    # those collections cheap. Automatic collection stays on while timing, as in real use.
    gc.collect()
    gc.freeze()
    try:
        for w in workloads:
            bar.set_postfix_str(w.label)
            ids, mask = make_inputs(model, w.batch, w.tokens, settings.seed)
            if w.kind == "prefill":
                def fn(ids=ids, mask=mask):
                    return time_prefill(model, ids, mask)
            else:
                timer = time_generate if w.kind == "generate" else time_decode

                def fn(ids=ids, mask=mask, n=w.new_tokens, timer=timer):
                    return timer(model, ids, mask, n)
            for _ in range(settings.warmup):
                for v in variants:
                    run_variant(v, fn)
            per: dict[str | None, list[float]] = {v: [] for v in variants}
            for r in range(w.repeats):
                k = r % len(variants)
                for v in variants[k:] + variants[:k]:  # rotate the order round by round
                    load = _loadavg()
                    if load:
                        load_samples.append(load[0])
                    per[v].append(run_variant(v, fn))
            samples[w.key] = per

        memory: dict[str | None, dict[str, Any]] = {}
        memory_error = None
        if do_memory:
            bar.set_postfix_str("peak memory")
            for v in variants:
                if v in floors:  # a floor runs SK's plans: its memory is SK's
                    continue
                try:
                    if device.type == "cuda":
                        memory[v] = run_variant(v, lambda: _cuda_peak(model, shapes, settings.seed, device))
                    else:
                        spec = dict(model_spec or {}, overrides=None if v is None else cfgs[v], shapes=shapes,
                                    seed=settings.seed, threads=torch.get_num_threads())
                        memory[v] = _run_probe(spec, probe_timeout)
                        bar.update(1)
                except (RuntimeError, subprocess.TimeoutExpired) as exc:
                    memory_error = str(exc)
                    break
    finally:
        bar.close()
        gc.unfreeze()

    if device.type == "cuda":
        mem_method = "torch.cuda.max_memory_allocated over the prefill workloads, in this process"
    else:
        mem_method = ("CPU process peak RSS (VmHWM) of a fresh subprocess per variant that loads the model, "
                      "patches it (or not), resets the peak, then runs the prefill workloads; weights and the "
                      f"Python/torch runtime included; glibc MALLOC_MMAP_THRESHOLD_={MALLOC_MMAP_THRESHOLD} so "
                      "freed tensors leave the RSS")
    base = {w.key: _summary(samples[w.key][None]) for w in workloads}
    for w in workloads:
        if w.per_token:
            base[w.key]["tokens_per_s"] = w.batch / base[w.key]["median_s"]
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(model),
        "code": code,
        "model": model_info(model, (model_spec or {}).get("label") or (model_spec or {}).get("model")),
        "settings": asdict(settings),
        "workloads": [dict(asdict(w), key=w.key, label=w.label) for w in workloads],
        "memory_method": mem_method if do_memory else None,
        "memory_skipped": None if do_memory else (
            "disabled" if not settings.memory else "CPU memory needs a model_spec (a model a subprocess can load)"),
        "memory_error": memory_error if do_memory else None,
        "base": {"workloads": base, "memory": memory.get(None)},
        "configs": {},
    }
    base_mem = memory.get(None)
    for name, cfg in built.items():
        entry: dict[str, Any] = {"overrides": cfgs[name], "config": cfg.to_dict(), "plan_reuse": name in floors,
                                 "workloads": {}}
        for w in workloads:
            vps_s, base_s = samples[w.key][name], samples[w.key][None]
            s = _summary(vps_s)
            s["ratio"] = s["median_s"] / base[w.key]["median_s"]
            s["paired_ratio"] = statistics.median(v / b for v, b in zip(vps_s, base_s, strict=True))
            if w.per_token:
                s["tokens_per_s"] = w.batch / s["median_s"]
            target = None if name in floors else w.target_for(cfg)
            s["target"] = target
            s["pass"] = None if target is None else bool(s["ratio"] <= target)
            entry["workloads"][w.key] = s
        mem = memory.get(name)
        if mem is not None and base_mem is not None:
            mem = dict(mem, ratio=mem["peak_mb"] / base_mem["peak_mb"],
                       workload_ratio=mem["workload_mb"] / base_mem["workload_mb"] if base_mem["workload_mb"] > 0
                       else None, target=TARGET_MEMORY)
            mem["pass"] = bool(mem["ratio"] <= TARGET_MEMORY)
        entry["memory"] = mem
        result["configs"][name] = entry
    result["machine"]["loadavg_start"] = load_start
    result["machine"]["loadavg_end"] = _loadavg()
    if load_samples:
        result["machine"]["load_1m_during"] = {"min": min(load_samples), "median": statistics.median(load_samples),
                                               "max": max(load_samples)}
    result["wall_s"] = time.perf_counter() - t_start
    return result


# -- report ----------------------------------------------------------------------------------------------
def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def _cell(ratio: float, vps_s: float, base_s: float, ok: bool | None) -> str:
    mark = "" if ok is None else (" PASS" if ok else " FAIL")
    return f"{ratio:.2f}x ({_ms(vps_s)}/{_ms(base_s)} ms){mark}"


def format_report(result: dict[str, Any]) -> str:
    """Machine info, the ratio table with targets, and how to read it."""
    m, md, st = result["machine"], result["model"], result["settings"]
    workloads = result["workloads"]
    lines = [
        f"vps bench — model {md['name'] or '(in-memory)'} ({md['class']}, {md['params'] / 1e6:.1f}M params, "
        f"{md['dtype']}) on {m['device']} ({m['device_name']})",
        f"torch {m['torch']}, transformers {m['transformers']}, vps {m['vps']}, python {m['python']}; "
        f"torch threads {m['threads']} of {m['cpu_count']} CPUs",
    ]
    if code := result.get("code"):
        lines.append(f"vps source {code['source_sha256']} (git {code['git_commit'] or 'n/a'}"
                     f"{', uncommitted changes' if code['git_dirty'] else ''})")
    load = (f"load average (1/5/15 min): start {_fmt_load(m.get('loadavg_start'))}, "
            f"end {_fmt_load(m.get('loadavg_end'))}")
    if m.get("load_1m_during"):
        d = m["load_1m_during"]
        load += f"; 1-min during runs min/median/max {d['min']:.2f}/{d['median']:.2f}/{d['max']:.2f}"
    lines.append(load)
    busy = (m.get("load_1m_during") or {}).get("median", 0.0)
    if m.get("cpu_count") and busy > m["cpu_count"]:
        lines.append(f"WARNING: machine busy (1-min load {busy:.1f} on {m['cpu_count']} CPUs): absolute times are "
                     "inflated; trust the paired ratios more"
                     + ("; with several torch threads, busy cores make OpenMP threads wait on each other and "
                        "times jump erratically — --threads 1 is steadier" if m["threads"] > 1 else ""))
    lines.append(f"base (unpatched) measured in this same process, interleaved with every config in rotating order "
                 f"after {st['warmup']} warm-up run(s); medians of {st['prefill_repeats']} (prefill) / "
                 f"{st['decode_repeats']} (decode) rounds{' [--quick sizes]' if st['quick'] else ''}")
    lines.append("cells: ratio vps/base (vps ms / base ms); decode = ms per token (decode steps only, "
                 f"{st['new_tokens']} new tokens after an untimed {st['prompt_tokens']}-token prefill); "
                 f"generate() = ms per new token of one greedy generate() call ({st['new_tokens']} new tokens, "
                 "its prefill included)")
    if floors := [n for n, e in result["configs"].items() if e.get("plan_reuse")]:
        lines.append(f"{', '.join(floors)}: SK plans built by an untimed run, then reused: the rank-2 term alone, "
                     "the least any dynamic selection can cost (no target)")
    if result.get("memory_method"):
        lines.append(f"peak mem: {result['memory_method']}")
    elif result.get("memory_skipped"):
        lines.append(f"peak mem: skipped ({result['memory_skipped']})")
    if base_mem_info := result["base"].get("memory"):
        if not base_mem_info.get("peak_reset", True):
            lines.append("peak mem: WARNING: the peak RSS could not be reset after loading, so it includes the "
                         "loading peak and the ratios understate the difference")
    if result.get("memory_error"):
        lines.append(f"peak mem: error: {result['memory_error']}")
    lines.append("")

    header = ["config"] + [w["label"] for w in workloads] + ["peak mem"]
    targets = ["target"]
    for w in workloads:
        t = w["target"]
        targets.append("" if t is None else f"<= {t:.2f}x" + (" (frozen)" if w["frozen_only"] else ""))
    targets.append(f"<= {TARGET_MEMORY:.2f}x")
    base = result["base"]
    base_row = ["base"]
    for w in workloads:
        s = base["workloads"][w["key"]]
        base_row.append(f"{_ms(s['median_s'])} ms" + ("/tok" if w["kind"] != "prefill" else "")
                        + f" [{_ms(s['min_s'])}-{_ms(s['max_s'])}]")
    base_mem = base.get("memory")
    base_row.append(f"{base_mem['peak_mb']:.0f} MB" if base_mem else "-")
    rows = [header, targets, base_row]
    for name, entry in result["configs"].items():
        row = [name]
        for w in workloads:
            s = entry["workloads"][w["key"]]
            row.append(_cell(s["ratio"], s["median_s"], base["workloads"][w["key"]]["median_s"], s["pass"]))
        mem = entry.get("memory")
        if mem and "ratio" in mem:
            row.append(f"{mem['ratio']:.3f}x ({mem['peak_mb']:.0f}/{base_mem['peak_mb']:.0f} MB)"
                       + (" PASS" if mem["pass"] else " FAIL"))
        else:
            row.append("-")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for i, r in enumerate(rows):
        lines.append(" | ".join(c.ljust(widths[j]) for j, c in enumerate(r)).rstrip())
        if i == 1:
            lines.append("-+-".join("-" * wd for wd in widths))

    lines.append("")
    for w in workloads:
        if w["kind"] != "prefill":
            s = base["workloads"][w["key"]]
            lines.append(f"base {w['label']}: {s['tokens_per_s']:.1f} tokens/s")
    noisy = []
    for name, entry in result["configs"].items():
        for w in workloads:
            s = entry["workloads"][w["key"]]
            if abs(s["paired_ratio"] - s["ratio"]) > 0.05 * s["ratio"]:
                noisy.append(f"{name} {w['label']} (paired {s['paired_ratio']:.2f}x)")
    if noisy:
        lines.append("noisy (median ratio and per-round paired ratio differ by > 5%): " + ", ".join(noisy))
    if base_mem:
        mems = [f"{n} +{e['memory']['workload_mb']:.0f} MB" for n, e in result["configs"].items() if e.get("memory")]
        lines.append(f"RSS growth during the prefills (includes paging in memory-mapped weights on first use): base "
                     f"+{base_mem['workload_mb']:.0f} MB; " + ", ".join(mems))
    lines.append(f"wall time {result['wall_s']:.0f} s")
    return "\n".join(lines)


def _fmt_load(load: list[float] | None) -> str:
    return "n/a" if not load else " ".join(f"{x:.2f}" for x in load)


# -- profiling ---------------------------------------------------------------------------------------------
# -- subprocess entry point ----------------------------------------------------------------------------
def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vps.bench",
                                     description="Internal entry point of `vps bench` (use `vps bench`).")
    parser.add_argument("--memory-probe", required=True, metavar="JSON",
                        help="measure peak RSS for one variant (JSON spec: model, dtype, device, overrides, shapes)")
    args = parser.parse_args(argv)
    print(json.dumps(memory_probe(json.loads(args.memory_probe))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
