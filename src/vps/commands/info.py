"""``vps info``: versions, model cache, which models are cached and where GSM8K data is read from."""

from __future__ import annotations

import argparse
import platform
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--time-load", action="store_true",
                   help="also load the default model and print how long a (cached) load takes")


def run(args: argparse.Namespace) -> int:
    import torch
    import transformers

    from .. import __version__
    from ..models import MODEL_ALIASES, cache_dir, cached_models, load_model

    print(f"vps {__version__}  python {platform.python_version()}  torch {torch.__version__}  "
          f"transformers {transformers.__version__}")
    print(f"cuda available: {torch.cuda.is_available()}  threads: {torch.get_num_threads()}")
    print(f"model cache: {cache_dir()}")
    print("known aliases: " + ", ".join(MODEL_ALIASES))
    cached = cached_models()
    if not cached:
        print("cached models: none")
    for m in cached:
        # Entries made before the bundled GGUFs were pinned, and local GGUFs, record no digest.
        digest = f"gguf sha256 {m['gguf_sha256']}" if m.get("gguf_sha256") else "gguf sha256 not recorded"
        print(f"  {m['name']}: {m['path']} ({m['size_bytes'] / 1e6:.0f} MB, {digest})")
    for line in data_lines():
        print(line)
    if args.time_load:
        start = time.perf_counter()
        load_model()
        print(f"default model load: {time.perf_counter() - start:.2f} s")
    return 0


def data_lines() -> list[str]:
    """Where ``gsm8k:test`` / ``gsm8k:train`` (``vps eval --data``, ``vps tune``, lm-eval's ``gsm8k_local``)
    are read from, resolved exactly as those commands resolve them (`vps.evaluation.data.gsm8k_path`)."""
    import os

    from ..evaluation.data import DATA_DIR_ENV, GSM8K_SPLITS, gsm8k_path

    override = os.environ.get(DATA_DIR_ENV)
    how = (f"${DATA_DIR_ENV}={override}" if override else
           f"{DATA_DIR_ENV} not set: the first shared/data/gsm8k above the working directory, then above the package")
    lines = [f"data (gsm8k:<split>): {how}"]
    for split in GSM8K_SPLITS:
        try:
            lines.append(f"  {split}: {gsm8k_path(split)}")
        except FileNotFoundError as exc:
            lines.append(f"  {split}: not found ({exc})")
    return lines
