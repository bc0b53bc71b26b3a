#!/usr/bin/env python
"""How much of a vote method's sampling compute went to tokens it kept: a reading of a stored run's rows.

HF ``generate`` decodes every row of a batch until the last row stops: a row that met its stop string or
EOS early is still carried through every later step. A ``maj@K`` batch of B items draws its B x K samples
in one call (up to `vps.refinement.loop.MAX_SAMPLE_ROWS` rows), so one sample that runs on to
``--max-new-tokens`` holds all of them there. This script reads a run's vote rows and reports, per batch
(consecutive rows of one configuration, ``batch_size`` as each row records it), the tokens its samples kept
(the rows' stored ``sample_record.tokens``) against the row-steps the call ran (rows x the longest sample,
whose length is its stored text re-tokenized, at most ``max_new_tokens``: the stored texts are cut at the
stop string, so this is a lower bound of the steps run). Nothing is generated; only the tokenizer loads.

    python benchmarks/sampling_row_steps.py results/qwen15-bf16-vote-n50 --config maj@4 \\
        --out benchmarks/results/20261205-sampling-row-steps-qwen15-vote-n50.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a vps eval run directory (run.json, results.jsonl)")
    p.add_argument("--config", required=True, help="the vote configuration to read, e.g. maj@4")
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)
    for name in ("run.json", "results.jsonl"):
        if not (args.run / name).is_file():
            p.error(f"run: {args.run / name} does not exist")
    settings = json.loads((args.run / "run.json").read_text())
    rows = [json.loads(line) for line in (args.run / "results.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("config") == args.config]
    if not rows or not all(isinstance(r.get("vote"), dict) for r in rows):
        p.error(f"--config: {args.config!r} has no vote rows in {args.run}")

    from transformers import AutoTokenizer

    from vps.models.cache import cache_entry

    # The tokenizer alone, from the model's converted copy: loading the model beside a running job would
    # take gigabytes for nothing.
    entry = cache_entry(settings["model"])
    if entry is None:
        p.error(f"run: model {settings['model']!r} of run.json has no converted copy in the model cache (`vps info` "
                "lists them); load it once, e.g. with vps generate --model")
    tok = AutoTokenizer.from_pretrained(entry)
    cap = int(settings["max_new_tokens"])
    batches, start = [], 0
    while start < len(rows):
        size = int(rows[start].get("batch_size") or 1)
        batches.append(rows[start:start + size])
        start += size
    out = []
    for batch in batches:
        texts = [t for r in batch for t in r["vote"]["sample_record"]["texts"]]
        longest = min(cap, max(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts))
        kept = sum(int(r["vote"]["sample_record"]["tokens"]) for r in batch)
        out.append({"items": len(batch), "rows": len(texts), "kept_tokens": kept, "longest_sample": longest,
                    "row_steps": len(texts) * longest, "seconds": sum(float(r["seconds"]) for r in batch)})
    kept, steps = sum(b["kept_tokens"] for b in out), sum(b["row_steps"] for b in out)
    # A decoded text tokenized again can come out a token shorter than the ids generated.
    at_cap = sum(1 for b in out if b["longest_sample"] >= cap - 1)
    result = {
        "command": shlex.join(["python", "benchmarks/sampling_row_steps.py",
                               *(sys.argv[1:] if argv is None else argv)]),
        "run": str(args.run), "config": args.config, "model": settings["model"], "max_new_tokens": cap,
        "batches": len(out), "batches_run_to_the_cap": at_cap, "kept_tokens": kept, "row_steps_at_least": steps,
        "kept_share": kept / steps if steps else None,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "per_batch": out,
    }
    print(f"{args.config}: {len(out)} batches, {at_cap} of them ran to --max-new-tokens {cap}; the samples kept "
          f"{kept:,} tokens of at least {steps:,} row-steps decoded ({100 * kept / steps:.1f}%)")
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
