#!/usr/bin/env python
"""Cold compile time of a whole patched model against the unpatched one (issue #34, item 3).

``torch.compile(model.forward, fullgraph=True)`` traces every patched layer's plan (statistics, ranking,
policy, clip, Q: about 35 ops) into the model's graph. Inlined, those ops are compiled again for each of
the model's patched layers, so compile time grows with depth far faster than the unpatched model's.
A patched layer instead calls its plan as one nested compile region (`vps.plan_region`), compiled
once per shape class and stamped out for the other layers. This script measures three variants, each in
a fresh process with inductor's caches off (every compile is cold): the unpatched model, the patched
model with the plan inlined (the layer's plan function swapped for a plain wrapper, which is what every
version before the region traced), and the patched model as shipped (region). One prefill of a
random-weight Llama built from a config (``--blocks`` decoder blocks, no download), default mode.

    OMP_NUM_THREADS=1 python benchmarks/compile_time.py --blocks 4     # prints, appends to results/compile_time.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "compile_time.jsonl"
VARIANTS = ("base", "inline", "region")


def _one(variant: str, blocks: int) -> dict[str, float]:
    """Compile and run one prefill of ``variant`` in this process; compile seconds and the logits' largest
    difference from the same model run eagerly."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import vps
    from vps import planning as planning_mod
    from vps.compiling import CompileClock, cold_compiles

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=blocks,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=0, eos_token_id=1, bos_token_id=2, initializer_range=0.3)
    model = LlamaForCausalLM(cfg).eval()
    if variant != "base":
        vps.patch(model)
    if variant == "inline":
        plan = planning_mod.plan_tensors
        for layer in vps.vps_layers(model).values():
            layer.plan_fn = lambda *args: plan(*args)  # not plan_tensors itself, so no region is used
    ids = torch.randint(3, 97, (2, 16))
    torch._inductor.config.compile_threads = 1  # no worker pool: the figure is one process's work
    with torch.no_grad():
        want = model(input_ids=ids).logits
        forward = torch.compile(model.forward, fullgraph=True)
        with cold_compiles() as cold, CompileClock() as clock:
            got = forward(input_ids=ids).logits
    assert cold, "this torch cannot switch inductor's caches off"
    return {"compile_s": clock.seconds, "max_abs_diff": float((got - want).abs().max())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=4, help="decoder blocks of the random-weight Llama")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--no-save", action="store_true", help=f"print only; do not append to {RESULTS}")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(_one(args.child, args.blocks)))
        return 0
    variants = args.variants.split(",")
    if unknown := [v for v in variants if v not in VARIANTS]:
        p.error(f"--variants: unknown {', '.join(unknown)}; expected some of {', '.join(VARIANTS)}")
    import torch
    import transformers

    row: dict[str, object] = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "blocks": args.blocks,
                              "torch": torch.__version__, "transformers": transformers.__version__,
                              "omp_threads": os.environ.get("OMP_NUM_THREADS"),
                              "loadavg_start": list(os.getloadavg())}
    for v in variants:
        out = subprocess.run([sys.executable, __file__, "--child", v, "--blocks", str(args.blocks)],
                             capture_output=True, text=True, check=False)
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"variant {v} failed (exit {out.returncode})")
        row[v] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{v:7s} compile {row[v]['compile_s']:7.1f} s   max |compiled - eager| {row[v]['max_abs_diff']:.1e}",
              flush=True)
    row["loadavg_end"] = list(os.getloadavg())
    if "base" in row:
        for v in ("inline", "region"):
            if v in row:
                print(f"{v} / base: {row[v]['compile_s'] / row['base']['compile_s']:.2f}x")
    if not args.no_save:
        with RESULTS.open("a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
