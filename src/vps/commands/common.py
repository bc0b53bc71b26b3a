"""Arguments shared by several subcommands: model choice and VPS config overrides."""

from __future__ import annotations

import argparse
from typing import Any

from ..config import VPSConfig


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="alias (smollm2-135m, qwen2.5-coder-0.5b), local dir, .gguf file or hub id; "
                        "default: the bundled SmolLM2-135M-Instruct")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("VPS configuration (defaults: the seed's)")
    g.add_argument("--config", default=None, help="VPSConfig JSON file (written by VPSConfig.save)")
    g.add_argument("--rank", type=int)
    g.add_argument("--topk", type=int)
    g.add_argument("--gamma", type=float)
    g.add_argument("--tau", type=float)
    g.add_argument("--builder", choices=["sk", "sc", "hybrid"])
    g.add_argument("--order", type=int, choices=[1, 2])
    g.add_argument("--decode-mode", choices=["frozen", "dynamic"])
    g.add_argument("--no-qk-coupling", action="store_true")
    g.add_argument("--fixed", action="store_true", help="turn the adaptive policy off (fixed rank and gamma)")


def config_from_args(args: argparse.Namespace) -> VPSConfig:
    cfg = VPSConfig.load(args.config) if args.config else VPSConfig()
    overrides: dict[str, Any] = {}
    for name in ("rank", "topk", "gamma", "tau", "builder", "order"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.decode_mode:
        overrides["decode_mode"] = args.decode_mode
    if args.no_qk_coupling:
        overrides["qk_coupling"] = False
    if args.fixed:
        overrides.update(adaptive_rank=False, adaptive_gamma=False)
    if "rank" in overrides and "topk" not in overrides and overrides["rank"] > cfg.topk:
        overrides["topk"] = overrides["rank"]
    return cfg.replace(**overrides) if overrides else cfg


def load(args: argparse.Namespace):
    import torch

    from ..models import load_model

    dtype = getattr(torch, args.dtype)
    device = args.device or ("cuda" if torch.cuda.is_available() else None)
    return load_model(args.model, dtype=dtype, device=device)
