#!/usr/bin/env python
"""The prefill plan compiled as a region (`vps.compile_plans`): kernels per patched layer against eager ops,
and the prefill time against the unpatched model (issue #34, item 2).

Eager: every op dispatched inside one call of the plan function (`vps.planning.plan_tensors`: statistics,
ranking, policy, selection, clip and Q) is counted under a ``TorchDispatchMode``, views apart, and
averaged over the patched layers. On a GPU nearly every non-view op is one kernel launch.

Compiled: the plan function is compiled with ``dynamic=True`` (inductor unless ``--backend``), inductor's
FX graph cache off so that every graph is generated here. Each generated graph's ``call`` body is read
for what it launches: fused kernels (``cpp_fused_*`` on CPU, triton kernels on a GPU) and calls that
stay outside the fused code (``extern_kernels.*``, ``aten.*`` fallbacks such as ``topk``). Each layer
is mapped to the graph it runs: the graph its first call compiled, or, for a later layer, the graph of
the first layer whose call had the same signature (which arguments are None, d_in, d_out, batch). The
figure per patched layer is the mean over the layers of their graph's launches. inductor's own
``generated_kernel_count`` (all graphs together) is reported beside it.

Time: median over ``--repeats`` prefills (no cache, no grad, logits of the last token only, as
`plan_ops.py` runs them) of the unpatched model, the patched model with eager plans and with compiled
plans, in one process after warm-up; ratios against unpatched.
Compile time is the first compiled prefill's `CompileClock`.

    OMP_NUM_THREADS=1 python benchmarks/plan_kernels.py                    # tiny Llama, 2x64, inductor
    OMP_NUM_THREADS=1 python benchmarks/plan_kernels.py --arch smollm2 --layers 2 --shape 1x256
    python benchmarks/plan_kernels.py --device cuda --arch smollm2          # on a GPU: triton kernels

Appends one row to benchmarks/results/plan_kernels.jsonl (``--no-save``: print only).
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

import vps
from vps.compiling import CompileClock, compiled_plan_function
from vps.planning import plan_tensors

RESULTS = Path(__file__).resolve().parent / "results"
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
               vocab_size=49152, tie_word_embeddings=True)  # SmolLM2-135M's shapes (30 blocks in the real one)
TINY = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, vocab_size=97)
# A launch in a generated graph's call(): a fused kernel, or an op left outside the fused code.
_KERNEL = re.compile(r"^\s*(?:\w+\s*=\s*)?(cpp_fused_\w+|triton_\w+)(?:\.run)?\(", re.M)
_EXTERN = re.compile(r"^\s*(?:[\w, ]+=\s*)?(extern_kernels\.\w+|(?:torch\.ops\.)?aten\.\w+(?:\.\w+)?)\(", re.M)


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


class _Count(TorchDispatchMode):
    """Dispatched ops, views apart, while ``active``."""

    def __init__(self) -> None:
        super().__init__()
        self.active = False
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if self.active:
            self.ops["view" if func.is_view else "compute"] += 1
        return func(*args, **(kwargs or {}))


def _model(arch: str, layers: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    shapes = SMOLLM2 if arch == "smollm2" else TINY
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, **shapes)).eval()


def _signature(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """What selects a plan call's graph: which optional arguments are given, the feature sizes, batch 1 or not."""
    x, h0 = args[3], args[4]
    return (tuple(a is None for a in args[6:8] + args[9:10] + args[11:15] + args[16:17]), x.shape[0] == 1, x.shape[-1],
            h0.shape[-1], x.dtype)


def eager_plan_ops(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, float]:
    """Ops per call of the eager plan function, averaged over the patched layers of one prefill."""
    layers = list(vps.vps_layers(model).values())
    mode = _Count()

    def counted(*args: Any) -> Any:
        mode.active = True
        try:
            return plan_tensors(*args)
        finally:
            mode.active = False

    for layer in layers:
        layer.plan_fn = counted
    try:
        with torch.no_grad(), mode:
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
    finally:
        for layer in layers:
            layer.plan_fn = plan_tensors
    return {kind: mode.ops[kind] / len(layers) for kind in ("compute", "view")}


def launches(code: str) -> dict[str, int]:
    """Fused kernels and calls outside the fused code in the ``call`` function of one generated graph."""
    body = code[code.find("def call("):]
    end = body.find("\ndef ", 1)
    body = body if end < 0 else body[:end]
    return {"kernels": len(_KERNEL.findall(body)), "extern": len(_EXTERN.findall(body))}


def compiled_plan_launches(model: torch.nn.Module, ids: torch.Tensor, backend: str) -> dict[str, Any]:
    """Compile the plans on the first prefill; launches per graph and per patched layer, compile time."""
    import torch._inductor.config as inductor_config
    from torch._inductor import metrics
    from torch._inductor.graph import GraphLowering

    torch._dynamo.reset()
    inductor_config.fx_graph_cache = False  # every graph generated (and timed) here, none loaded
    codes: list[str] = []
    original_save = GraphLowering.save_output_code
    GraphLowering.save_output_code = staticmethod(codes.append)  # type: ignore[assignment]
    compiled = compiled_plan_function(backend)
    layer_graph: list[int | None] = []
    first_graph_of: dict[tuple[Any, ...], int] = {}

    def recording(*args: Any) -> Any:
        before = len(codes)
        out = compiled(*args)
        sig = _signature(args)
        if len(codes) > before:  # this call generated a graph: it runs the newest one
            first_graph_of.setdefault(sig, len(codes) - 1)
            layer_graph.append(len(codes) - 1)
        else:
            layer_graph.append(first_graph_of.get(sig))
        return out

    layers = list(vps.vps_layers(model).values())
    for layer in layers:
        layer.plan_fn = recording
    metrics.reset()
    try:
        with torch.no_grad(), CompileClock() as clock:
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
    finally:
        GraphLowering.save_output_code = original_save  # type: ignore[method-assign]
        for layer in layers:
            layer.plan_fn = compiled
    per_graph = [launches(c) for c in codes]
    mapped = [per_graph[g] for g in layer_graph if g is not None]
    return {
        "graphs": len(codes), "per_graph": per_graph,
        "layers_mapped": len(mapped), "layers": len(layer_graph),
        "launches_per_layer": {k: statistics.fmean(m[k] for m in mapped) if mapped else None
                               for k in ("kernels", "extern")},
        "generated_kernel_count": metrics.generated_kernel_count,
        "compile_s": clock.seconds, "compilations": clock.compilations,
    }


def _median_time(model: torch.nn.Module, ids: torch.Tensor, repeats: int) -> float:
    times = []
    with torch.no_grad():
        model(input_ids=ids, use_cache=False, logits_to_keep=1)  # warm-up
        for _ in range(repeats):
            if ids.is_cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
            if ids.is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="tiny", choices=["tiny", "smollm2"], help="random-weight Llama shapes")
    p.add_argument("--layers", type=int, default=2, help="decoder blocks (default 2)")
    p.add_argument("--shape", default="2x64", help="prefill BATCHxTOKENS (default 2x64)")
    p.add_argument("--backend", default="inductor", help="torch.compile backend of the plan region")
    p.add_argument("--builder", default="hybrid", choices=["sk", "sc", "hybrid"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=15, help="timed prefills per mode (default 15)")
    p.add_argument("--no-save", action="store_true", help="print only; do not append to results/plan_kernels.jsonl")
    args = p.parse_args(argv)
    try:
        batch, tokens = (int(v) for v in args.shape.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--shape: expected BATCHxTOKENS, got {args.shape!r}") from None
    if os.environ.get("OMP_NUM_THREADS") == "1":
        torch.set_num_threads(1)
    model = _model(args.arch, args.layers).to(args.device)
    ids = torch.randint(3, model.config.vocab_size, (batch, tokens),
                        generator=torch.Generator().manual_seed(0)).to(args.device)
    base_s = _median_time(model, ids, args.repeats)
    vps.patch(model, vps.VPSConfig(builder=args.builder))
    eager_ops = eager_plan_ops(model, ids)
    eager_s = _median_time(model, ids, args.repeats)
    compiled = compiled_plan_launches(model, ids, args.backend)
    compiled_s = _median_time(model, ids, args.repeats)
    row = {"when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "commit": _commit(),
           "torch": torch.__version__, "device": args.device, "threads": torch.get_num_threads(),
           "load_avg": list(os.getloadavg()), "arch": args.arch, "layers": args.layers, "shape": [batch, tokens],
           "builder": args.builder, "backend": args.backend, "patched_layers": len(vps.vps_layers(model)),
           "eager_plan_ops_per_layer": eager_ops, "compiled": compiled,
           "prefill_s": {"base": base_s, "eager_plans": eager_s, "compiled_plans": compiled_s},
           "ratio_vs_base": {"eager_plans": eager_s / base_s, "compiled_plans": compiled_s / base_s}}
    lp = compiled["launches_per_layer"]
    print(f"{args.arch} x{args.layers} blocks, prefill {batch}x{tokens}, {args.builder}, {row['patched_layers']} "
          f"patched layers, backend {args.backend}, {args.device}, {row['threads']} thread(s)")
    print(f"  eager plan: {eager_ops['compute']:.1f} ops (+{eager_ops['view']:.1f} views) per patched layer")
    print(f"  compiled plan: {compiled['graphs']} graph(s) in {compiled['compile_s']:.1f} s; per patched layer "
          f"{lp['kernels']} fused kernels + {lp['extern']} calls outside them "
          f"({compiled['layers_mapped']}/{compiled['layers']} layers mapped to their graph); "
          f"generated_kernel_count {compiled['generated_kernel_count']}")
    for i, g in enumerate(compiled["per_graph"]):
        print(f"    graph {i}: {g['kernels']} kernels + {g['extern']} extern")
    print(f"  prefill median: base {base_s * 1e3:.2f} ms, eager plans {eager_s * 1e3:.2f} ms "
          f"({row['ratio_vs_base']['eager_plans']:.2f}x), compiled plans {compiled_s * 1e3:.2f} ms "
          f"({row['ratio_vs_base']['compiled_plans']:.2f}x)")
    if not args.no_save:
        RESULTS.mkdir(exist_ok=True)
        with (RESULTS / "plan_kernels.jsonl").open("a") as fh:
            fh.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
