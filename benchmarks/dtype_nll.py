#!/usr/bin/env python
"""float32 vs bfloat16 for the gold-solution NLL of a bundled model: seconds per item and how far the
NLLs (and the VPS - base differences) move, on GSM8K *train* items, batch as the harness runs them.

    python benchmarks/dtype_nll.py --model qwen2.5-coder-1.5b --prompt fewshot --items 8 --threads 1

Decides whether a long NLL run may use bfloat16 ("measured faster for the whole run"): each dtype is
loaded in turn, scores the same items unpatched and patched (seed defaults), and the script prints
one JSON object (also appended to benchmarks/results/dtype_nll.jsonl).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import statistics
import time
from pathlib import Path

import torch

import vps
from vps.evaluation.data import load_items
from vps.evaluation.nll import solution_nll
from vps.prompting import PROMPT_STYLES, PromptSettings

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen2.5-coder-1.5b")
    p.add_argument("--prompt", default="fewshot", choices=PROMPT_STYLES)
    p.add_argument("--items", type=int, default=8)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    items = load_items("gsm8k:train", sample=args.items, seed=args.seed).items
    fmt = PromptSettings(args.prompt).format()  # fewshot: the run settings' shots of GSM8K train
    out: dict = {"when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "model": args.model,
                 "prompt": args.prompt, "items": len(items), "threads": args.threads}
    nll: dict[str, list[float]] = {}
    for dtype in ("float32", "bfloat16"):
        model, tok = vps.load_model(args.model, dtype=getattr(torch, dtype))
        prompts = [fmt.render(tok, it.question) for it in items]
        solutions = [fmt.solution_prefix + it.answer for it in items]
        for method in ("base", "vps"):
            start = time.perf_counter()
            if method == "vps":
                with vps.patched(model, vps.VPSConfig()):
                    scores = solution_nll(model, tok, prompts, solutions)
            else:
                scores = solution_nll(model, tok, prompts, solutions)
            out[f"{dtype}_{method}_seconds_per_item"] = (time.perf_counter() - start) / len(items)
            nll[f"{dtype}_{method}"] = [s.nll for s in scores]
        del model
        gc.collect()
    for method in ("base", "vps"):
        fp32, bf16 = out[f"float32_{method}_seconds_per_item"], out[f"bfloat16_{method}_seconds_per_item"]
        out[f"{method}_speedup"] = fp32 / bf16
        gaps = [abs(a - b) for a, b in zip(nll[f"float32_{method}"], nll[f"bfloat16_{method}"], strict=True)]
        out[f"{method}_max_abs_nll_gap"] = max(gaps)
        out[f"{method}_mean_nll_float32"] = statistics.fmean(nll[f"float32_{method}"])
    for dtype in ("float32", "bfloat16"):
        out[f"{dtype}_vps_minus_base"] = statistics.fmean(
            v - b for v, b in zip(nll[f"{dtype}_vps"], nll[f"{dtype}_base"], strict=True))
    print(json.dumps(out, indent=2))
    RESULTS.mkdir(exist_ok=True)
    with (RESULTS / "dtype_nll.jsonl").open("a") as fh:
        fh.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
