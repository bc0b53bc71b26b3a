#!/usr/bin/env python
"""Save a model's architecture with random weights, for timing where the trained weights cannot go.

Reads ``config.json`` and the tokenizer files from SRC (a model directory, e.g. the bundled model's
cache), initialises the weights at random (seeded) and writes a checkpoint directory DEST that
`vps.load_model` and ``vps bench --model DEST`` accept. Timings of such a copy equal the trained
model's: every forward does the same work whatever the weights' values (``vps bench`` feeds random
token ids and decodes a fixed number of steps). Its outputs are meaningless; never evaluate with it.

    python benchmarks/random_weights.py ~/.cache/vps/models/smollm2-135m /tmp/smollm2-random
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "generation_config.json")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", type=Path, help="directory with config.json and the tokenizer files")
    p.add_argument("dest", type=Path, help="directory to write the random-weight checkpoint to")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not (args.src / "config.json").is_file():
        raise SystemExit(f"src: {args.src} has no config.json")
    if not (args.src / "tokenizer.json").is_file():
        raise SystemExit(f"src: {args.src} has no tokenizer.json")
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.src), dtype=torch.float32)
    args.dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.dest)
    for name in TOKENIZER_FILES:
        if (args.src / name).is_file():
            shutil.copy(args.src / name, args.dest / name)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.dest}: {model.config.model_type}, {n / 1e6:.1f}M parameters, random weights (seed {args.seed})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
