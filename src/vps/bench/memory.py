"""Peak memory of a variant: in process on CUDA, in a fresh subprocess per variant on CPU.

On CPU the figure is the process peak RSS (``VmHWM``) of a subprocess that loads the model, patches
it (or not) and runs the prefill workloads: `run_probe` starts ``python -m vps.bench --memory-probe
SPEC`` (``bench/__main__.py`` hands it to `main`), whose body is `memory_probe`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..patching import patch
from .presets import make_config
from .timing import make_inputs, time_prefill

__all__ = ["MALLOC_MMAP_THRESHOLD", "cuda_peak", "main", "memory_method", "memory_probe", "run_memory_workload",
           "run_probe"]

MALLOC_MMAP_THRESHOLD = 128 * 1024  # bytes; see run_probe


def run_memory_workload(model: nn.Module, shapes: Sequence[tuple[int, int]], seed: int) -> None:
    """The prefills whose peak memory is measured (batched shape first, as the probe does)."""
    for b, t in sorted(shapes, key=lambda s: -s[0]):
        ids, mask = make_inputs(model, b, t, seed)
        time_prefill(model, ids, mask)


def memory_method(device: torch.device) -> str:
    """How the peak-memory figures on ``device`` are taken, as the result's ``memory_method`` states it."""
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated over the prefill workloads, in this process"
    return ("CPU process peak RSS (VmHWM) of a fresh subprocess per variant that loads the model, "
            "patches it (or not), resets the peak, then runs the prefill workloads; weights and the "
            f"Python/torch runtime included; glibc MALLOC_MMAP_THRESHOLD_={MALLOC_MMAP_THRESHOLD} so "
            "freed tensors leave the RSS")


# -- CPU: this process's resident set ---------------------------------------------------------------
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


# -- CPU: the probe subprocess ----------------------------------------------------------------------
def memory_probe(spec: dict[str, Any]) -> dict[str, Any]:
    """Body of the ``--memory-probe`` subprocess: load, maybe patch, run the prefills, report peak RSS.

    Loading a checkpoint briefly needs more memory than the loaded model holds, so the peak is reset
    (Linux ``/proc/self/clear_refs``) after loading and patching; the reported ``peak_mb`` is then
    the process peak RSS (``VmHWM``) while the prefills run (weights and runtime included). Without
    the reset (``peak_reset`` false) it is the peak of the whole process, loading included.
    ``ru_maxrss`` is reported too but not used: in a child of the benchmarking process it is floored
    by the parent's RSS at fork time.
    """
    from ..models import load_model

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


def run_probe(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run `memory_probe` on ``spec`` in a fresh Python process; RuntimeError if it fails."""
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


def main(argv: list[str] | None = None) -> int:
    """The subprocess entry point (``python -m vps.bench --memory-probe SPEC``): print `memory_probe`'s JSON."""
    parser = argparse.ArgumentParser(prog="python -m vps.bench",
                                     description="Internal entry point of `vps bench` (use `vps bench`).")
    parser.add_argument("--memory-probe", required=True, metavar="JSON",
                        help="measure peak RSS for one variant (JSON spec: model, dtype, device, overrides, shapes)")
    args = parser.parse_args(argv)
    print(json.dumps(memory_probe(json.loads(args.memory_probe))), flush=True)
    return 0


# -- CUDA ---------------------------------------------------------------------------------------------
def cuda_peak(model: nn.Module, shapes: Sequence[tuple[int, int]], seed: int, device: torch.device) -> dict:
    """Peak allocated CUDA memory over the prefill workloads, in this process (MB)."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device) / 2**20
    torch.cuda.reset_peak_memory_stats(device)
    run_memory_workload(model, shapes, seed)
    peak = torch.cuda.max_memory_allocated(device) / 2**20
    return {"peak_mb": peak, "after_setup_mb": before, "workload_mb": peak - before}
