#!/usr/bin/env python
"""The GPU figures of issue #18 in one run: random-weight Qwen2.5-1.5B / 7B architectures, bfloat16.

For each architecture (built from a config written here; the trained weights cannot travel to a
lent GPU machine, and a forward does the same work whatever the weights are):

1. ops per forward: torch ops and CUDA kernel launches of one prefill, unpatched and SK-patched,
   and the difference per patched layer (eager);
2. eager `vps bench`: prefill 1 x 2048 and 8 x 512, greedy decode batch 1 and 8, peak memory;
3. compiled `vps bench --compile reduce-overhead` (CUDA graphs; decode into a static cache);
4. compile time, unpatched vs SK-patched: one prefill and two decode steps into a static cache, each
   variant compiled afresh (dynamo reset between them), its result written as soon as it is measured.

Every step writes its JSON / text under --out as soon as it is done, so a run cut short by a time
limit still returns what it measured. On a CPU, ``--tiny`` runs the same steps on a tiny Qwen2 in a
minute or two (a check of the script, not a measurement).

    python benchmarks/gpu_figures.py --out "$OUT"                       # on the GPU machine
    python benchmarks/gpu_figures.py --out /tmp/gpu-check --tiny        # here, to check the script
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import Qwen2Config, Qwen2ForCausalLM

import vps
from vps.bench import BenchSettings, format_report, run_benchmark
from vps.bench.timing import forward_kwargs, make_inputs, sync_device, time_decode
from vps.compiling import CompileClock, compile_forward, recompile_limit, uncompile_forward

# Qwen2.5 architectures (the published configs' shapes; random weights).
ARCHS: dict[str, dict[str, Any]] = {
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=97, tie_word_embeddings=False),
}
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cudaGraphLaunch")


def build(arch: str, device: torch.device, dtype: torch.dtype) -> Qwen2ForCausalLM:
    cfg = Qwen2Config(**ARCHS[arch], max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                      pad_token_id=0, eos_token_id=1, bos_token_id=2)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg).to(dtype)
    return model.eval()


def op_counts(model: torch.nn.Module, batch: int, tokens: int) -> dict[str, Any]:
    """Torch ops (top level of the profile) and kernel launches of one prefill, unpatched vs SK-patched."""
    device = next(model.parameters()).device
    ids, mask = make_inputs(model, batch, tokens, 0)
    kwargs = forward_kwargs(model)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])

    def count() -> dict[str, float]:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, **kwargs)  # warm-up
            sync_device(device)
            with profile(activities=activities) as prof:
                model(input_ids=ids, attention_mask=mask, **kwargs)
                sync_device(device)
        events = prof.events()
        aten = sum(1 for e in events if e.name.startswith("aten::") and e.cpu_parent is None)
        launches = sum(1 for e in events if e.name in LAUNCHES)
        busy = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA") / 1e3
        return {"aten_ops": aten, "kernel_launches": launches, "gpu_busy_ms": busy}

    base = count()
    with vps.patched(model, vps.VPSConfig(builder="sk")):
        layers = len(vps.vps_layers(model))
        patched = count()
    per_layer = {k: (patched[k] - base[k]) / layers for k in ("aten_ops", "kernel_launches")}
    return {"shape": [batch, tokens], "patched_layers": layers, "base": base, "sk": patched, "per_layer": per_layer}


def compile_times(model: torch.nn.Module, mode: str, batch: int, tokens: int, out: Path) -> dict[str, Any]:
    """Compile time of the unpatched model, then of the SK-patched one (same weights), each on a fresh dynamo.

    The call compiled and timed is `time_decode` with a static cache (a prefill and two decode steps:
    the two graphs a compiled ``generate()`` needs), first under a `CompileClock`, then once more to
    show the compiled call's own time. Each variant's figures go to ``out`` as soon as they exist.
    """
    ids, mask = make_inputs(model, batch, tokens, 0)
    result: dict[str, Any] = {"mode": mode, "shape": [batch, tokens], "decode_steps": 2}
    for name in ("base", "sk"):
        torch._dynamo.reset()
        if name == "sk":
            vps.patch(model, vps.VPSConfig(builder="sk"))
        compile_forward(model, mode)
        try:
            with recompile_limit(64):
                start = time.perf_counter()
                with CompileClock() as clock:
                    time_decode(model, ids, mask, 2, static=True)
                first = time.perf_counter() - start
                with CompileClock() as again:
                    step_s = time_decode(model, ids, mask, 2, static=True)
        finally:
            uncompile_forward(model)
            if name == "sk":
                vps.unpatch(model)
        # A patched model's second call can recompile (its first prefill ran without a plan): a user pays both.
        result[name] = {"compile_s": clock.seconds + again.seconds, "compilations": clock.compilations,
                        "first_call_s": first, "decode_step_s": step_s,
                        "recompiled_on_second_call_s": again.seconds}
        if name == "sk":
            result["ratio"] = result["sk"]["compile_s"] / result["base"]["compile_s"]
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"compile {name}: {result[name]['compile_s']:.1f} s ({clock.compilations} compilation(s) in the first "
              f"call, {again.seconds:.1f} s recompiling in the second), first call {first:.1f} s", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="directory for the results (created)")
    p.add_argument("--archs", default="qwen2.5-1.5b,qwen2.5-7b")
    p.add_argument("--steps", default="ops,eager,compiled", help="a subset of ops,eager,compiled,compile")
    p.add_argument("--configs", default="sk,floor", help="vps bench configs (default: sk,floor)")
    p.add_argument("--compile-mode", default="reduce-overhead")
    p.add_argument("--tiny", action="store_true", help="a tiny Qwen2 on this machine: checks the script only")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    archs = ["tiny"] if args.tiny else [a.strip() for a in args.archs.split(",") if a.strip()]
    if bad := [a for a in archs if a not in ARCHS]:
        raise SystemExit(f"--archs: unknown {bad}; known: {', '.join(ARCHS)}")
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    if bad := [s for s in steps if s not in ("ops", "eager", "compiled", "compile")]:
        raise SystemExit(f"--steps: unknown {bad}; expected a subset of ops,eager,compiled,compile")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        settings = dict(prefill_shapes=[(1, 32), (2, 16)], decode_batches=[1, 2], prompt_tokens=8, new_tokens=4,
                        prefill_repeats=2, decode_repeats=1)
    else:
        settings = dict(prefill_shapes=[(1, 2048), (8, 512)], decode_batches=[1, 8], prompt_tokens=32,
                        new_tokens=32, prefill_repeats=5, decode_repeats=3)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    for arch in archs:
        start = time.perf_counter()
        model = build(arch, device, dtype)
        print(f"{arch}: built on {device} in {time.perf_counter() - start:.1f} s", flush=True)
        for step in steps:
            name = f"{arch}-{step}"
            try:
                if step == "ops":
                    b, t = settings["prefill_shapes"][0]
                    result: dict[str, Any] = op_counts(model, b, t)
                    text = json.dumps(result, indent=2)
                elif step == "compile":
                    result = compile_times(model, args.compile_mode, 1, settings["prompt_tokens"],
                                           args.out / f"{name}.json")
                    text = json.dumps(result, indent=2)
                else:
                    bench = BenchSettings(**settings, generate_batches=[], kinds=("prefill", "decode"),
                                          compile=args.compile_mode if step == "compiled" else None)
                    result = run_benchmark(model, args.configs, bench, progress=False)
                    text = format_report(result)
                (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
                (args.out / f"{name}.txt").write_text(text + "\n")
                print(f"=== {name} ===\n{text}", flush=True)
            except Exception:  # one failing step must not cost the others' figures
                (args.out / f"{name}.error.txt").write_text(traceback.format_exc())
                print(f"=== {name}: FAILED ===\n{traceback.format_exc()}", file=sys.stderr, flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del model
    return 0


if __name__ == "__main__":
    sys.exit(main())
