"""Arguments shared by several subcommands: model choice and VPS config overrides."""

from __future__ import annotations

import argparse
from typing import Any

from ..config import BUILDERS, DECODE_MODES, GAMMA_MAX, VPSConfig

_SEED = VPSConfig()


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="alias (smollm2-135m, qwen2.5-coder-0.5b, qwen2.5-coder-1.5b), local dir, .gguf file or "
                        "hub id; default: the bundled SmolLM2-135M-Instruct")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; give concurrent jobs 1 each on a small machine)")


def set_threads(args: argparse.Namespace) -> None:
    """Apply ``--threads`` (validated) before anything heavy runs."""
    if args.threads is None:
        return
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    import torch

    torch.set_num_threads(args.threads)


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("VPS configuration (defaults: the seed's)")
    g.add_argument("--config", default=None,
                   help="VPSConfig JSON file (written by VPSConfig.save); the flags below override its fields")
    g.add_argument("--rank", type=int,
                   help=f"rank r of the perturbation (the policy's upper bound; default {_SEED.rank})")
    g.add_argument("--topk", type=int,
                   help=f"candidate features the selectors choose among, >= rank (default {_SEED.topk}; a larger "
                        "--rank widens it to match)")
    g.add_argument("--gamma", type=float,
                   help=f"perturbation scale in [0, {GAMMA_MAX}] (the policy's upper bound; default {_SEED.gamma})")
    g.add_argument("--tau", type=float,
                   help=f"clip on each rank-1 term's spectral norm, > 0 (default {_SEED.tau})")
    g.add_argument("--builder", choices=BUILDERS,
                   help="selector builder: sk (activation statistics), sc (ridge-refined), hybrid (sc where a "
                        f"gradient was captured, else sk) (default {_SEED.builder})")
    g.add_argument("--order", type=int, choices=[1, 2],
                   help=f"terms of the series W sum (gamma U V^T W)^j (default {_SEED.order})")
    g.add_argument("--decode-mode", choices=DECODE_MODES,
                   help="frozen: decode steps keep the selectors built from the prompt; dynamic: rebuild them "
                        f"every step (default {_SEED.decode_mode})")
    g.add_argument("--no-qk-coupling", action="store_true",
                   help="select query and key dimensions independently (default: coupled)")
    g.add_argument("--fixed", action="store_true",
                   help="turn the adaptive policy off: rank and gamma exactly as given (default: adaptive)")


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
    check_device(device)
    return load_model(args.model, dtype=dtype, device=device)


def check_device(device: str | None) -> None:
    """Refuse a ``--device`` this torch build cannot use, before any model is loaded."""
    import torch

    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"--device: {device!r} is not a torch device ({exc})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA device is visible"
        raise ValueError(f"--device {device}: {why} (torch {torch.__version__}); use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
