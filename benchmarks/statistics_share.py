#!/usr/bin/env python
"""How much of SK's prefill overhead is the activation statistics, and how much the rest of the plan.

Times one prefill of the bundled default model (or ``--model``) three ways, interleaved in one
process after a warm-up round: unpatched, SK as shipped, and SK whose statistics are replaced by a stub
that reads one token per sequence (so ranking, policy, clip, Q and applying the perturbation still
run, on meaningless scores). The stub's ratio is what the plan costs without the statistics; the gap
to SK is the statistics. Medians of ``--repeats`` rounds, ratios to the unpatched median.

    python benchmarks/statistics_share.py --threads 1 --shape 1x512 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import torch

import vps
from vps import activation_stats as stats_mod
from vps.bench import make_inputs
from vps.context import TokenMask


def _stub_input(x: torch.Tensor, tm: TokenMask) -> torch.Tensor:
    return x[:, 0].float().abs()


def _stub_output(h: torch.Tensor, tm: TokenMask) -> tuple[torch.Tensor, torch.Tensor]:
    return h[:, 0].float().abs(), h[:, 0, 0].float().square()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="alias, directory or .gguf (default: the bundled model)")
    p.add_argument("--shape", default="1x512", help="BATCHxTOKENS of the prefill")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    try:
        batch, tokens = (int(v) for v in args.shape.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--shape: expected BATCHxTOKENS, got {args.shape!r}") from None
    if args.repeats < 1:
        raise SystemExit(f"--repeats: expected a positive integer, got {args.repeats}")
    torch.set_num_threads(args.threads)
    model, _ = vps.load_model(args.model)
    ids, mask = make_inputs(model, batch, tokens, 0)
    real = (stats_mod.input_scores, stats_mod.output_scores)

    def prefill() -> float:
        with torch.no_grad():
            start = time.perf_counter()
            model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
            return time.perf_counter() - start

    def timed(variant: str) -> float:
        if variant == "base":
            return prefill()
        stats: Any = (_stub_input, _stub_output) if variant == "sk, statistics stubbed" else real
        stats_mod.input_scores, stats_mod.output_scores = stats
        try:
            with vps.patched(model, vps.VPSConfig(builder="sk")):
                return prefill()
        finally:
            stats_mod.input_scores, stats_mod.output_scores = real

    variants = ["base", "sk", "sk, statistics stubbed"]
    times: dict[str, list[float]] = {v: [] for v in variants}
    for round_ in range(args.repeats + 1):  # round 0 warms up
        for v in variants[round_ % 3:] + variants[:round_ % 3]:
            took = timed(v)
            if round_:
                times[v].append(took)
    base = statistics.median(times["base"])
    print(f"prefill {args.shape}, {args.threads} thread(s), medians of {args.repeats} rounds")
    for v in variants:
        med = statistics.median(times[v])
        print(f"  {v:24s} {med * 1e3:8.0f} ms  {med / base:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
