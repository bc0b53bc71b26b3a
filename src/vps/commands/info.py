"""``vps info``: versions, model cache and which models are cached."""

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
    if args.time_load:
        start = time.perf_counter()
        load_model()
        print(f"default model load: {time.perf_counter() - start:.2f} s")
    return 0
