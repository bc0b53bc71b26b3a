#!/usr/bin/env python
"""Refining prompts together (`vps.refine_many`) against one `vps.refine` call per prompt.

Times, on the first N GSM8K test questions with the bundled model (or ``--model``): refine_many with
the samples of all prompts drawn in one batch (``sampling="streams"``, the default), refine_many with
the samples drawn one prompt at a time (``sampling="global"``), and one refine call per prompt. It
checks that every prompt's samples and best answer are the same every way.

    python benchmarks/refine_batching.py --prompts 8 --max-new-tokens 48 --threads 1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import vps
from vps.models import load_model
from vps.prompting import chat_prompt

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--data", type=Path, default=DATA, help=f"GSM8K-format JSONL (default: {DATA})")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--k-samples", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.data.is_file():
        raise SystemExit(f"--data: {args.data} is not a file")
    with args.data.open() as fh:
        questions = [json.loads(line)["question"] for line, _ in zip(fh, range(args.prompts), strict=False)]
    model, tok = load_model(args.model)
    model.eval()
    vps.patch(model, vps.VPSConfig())
    prompts = [chat_prompt(tok, q) for q in questions]
    kw = dict(iters=args.iters, k_samples=args.k_samples, max_new_tokens=args.max_new_tokens, seed=0)
    vps.refine(model, tok, prompts[0], iters=2, k_samples=2, max_new_tokens=2)  # untimed warm-up
    runs: dict[str, tuple[float, list]] = {}
    for name, call in (
        ("refine_many, samples batched", lambda: vps.refine_many(model, tok, prompts, sampling="streams", **kw)),
        ("refine_many, samples per prompt", lambda: vps.refine_many(model, tok, prompts, sampling="global", **kw)),
        ("one refine per prompt", lambda: [vps.refine(model, tok, prompt, **kw) for prompt in prompts]),
    ):
        t0 = time.perf_counter()
        results = call()
        runs[name] = (time.perf_counter() - t0, results)
    t_one, alone = runs["one refine per prompt"]
    print(f"{len(prompts)} prompts, {args.iters} iterations, {args.k_samples} samples, {args.max_new_tokens} new "
          f"tokens, {torch.get_num_threads()} thread(s):")
    for name, (seconds, results) in runs.items():
        same = sum(a.best_text == b.best_text and a.samples == b.samples
                   for a, b in zip(results, alone, strict=True))
        print(f"  {name}: {seconds:.1f} s, speed-up {t_one / seconds:.2f}x; same samples and best answer as one "
              f"refine per prompt {same}/{len(prompts)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
