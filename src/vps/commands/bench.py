"""``vps bench``: VPS overhead against the unpatched model (prefill, greedy decode, peak memory)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..compiling import COMPILE_MODES
from .common import add_model_arguments, check_threads, load


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..bench import DEFAULT_CONFIGS, PRESETS, WORKLOAD_KINDS

    add_model_arguments(p)
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                   help=f"comma-separated VPS configs, each a preset ({', '.join(PRESETS)}) optionally followed by "
                        "VPSConfig overrides, e.g. sk:rank=4:adaptive_rank=false (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed rounds per workload for prefill and decode alike (default: 5 prefill, 3 decode)")
    p.add_argument("--workloads", default=",".join(WORKLOAD_KINDS),
                   help="comma-separated workload kinds to time: prefill, decode (a cached single-token loop), "
                        "generate (model.generate itself) (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds before the timed ones (default: 1)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random token ids (default: 0)")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes and 2 rounds: a smoke test, not a measurement (so no target applies)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                   help="compile the base and every config the same way (torch.compile fullgraph; MODE: "
                        f"{', '.join(COMPILE_MODES)}; default mode when given bare); the warm-up compiles, and "
                        "each variant's compile time is reported beside the unpatched model's")
    p.add_argument("--json", action="store_true", help="print the machine-readable result (JSON) instead of the table")
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="also draw the ratios (per workload, with targets and round-to-round spread) to this PNG")
    p.add_argument("--profile", action="store_true",
                   help="instead of benchmarking: profile one patched prefill (the batched shape) and one patched "
                        "decode step (batch 1) with the first config; top 15 torch ops and Python functions")


def check_output_file(flag: str, path: Path) -> None:
    """Refuse, naming ``flag``, an output path that is a directory or lies below a file (ValueError)."""
    if str(path).strip() == "":
        raise ValueError(f"{flag} must name a file, got an empty value")
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a directory; name a file in it")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{flag} {path}: {parent} is a file, not a directory")
            break


def run(args: argparse.Namespace) -> int:
    import torch

    from ..bench import WORKLOAD_KINDS, BenchSettings, format_report, resolve_configs, run_benchmark
    from ..bench.profiling import profile_patched

    configs = resolve_configs(args.configs)  # fail on a bad config before loading anything
    if args.repeats is not None and args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    for flag, value in (("--out", args.out), ("--plot", args.plot)):
        if value:  # a path that cannot be written would lose the whole benchmark after it ran
            check_output_file(flag, Path(value))
    check_threads(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    make = BenchSettings.quick_settings if args.quick else BenchSettings
    kinds = tuple(k.strip() for k in args.workloads.split(",") if k.strip())
    bad = [k for k in kinds if k not in WORKLOAD_KINDS]
    if bad or not kinds:
        raise ValueError(f"--workloads: expected a comma-separated subset of {', '.join(WORKLOAD_KINDS)}, "
                         f"got {args.workloads!r}")
    settings = make(warmup=args.warmup, seed=args.seed, memory=not args.no_memory, kinds=kinds, compile=args.compile)
    if args.repeats is not None:
        settings.prefill_repeats = settings.decode_repeats = args.repeats
    settings.validate()

    model, _ = load(args)
    if args.profile:
        name, overrides = next(iter(configs.items()))
        print(f"profiling config {name!r} ({overrides}) on {next(model.parameters()).device}, "
              f"torch threads {torch.get_num_threads()}")
        print(profile_patched(model, overrides, settings))
        return 0
    from ..models import DEFAULT_MODEL

    model_spec = {"model": args.model, "dtype": args.dtype, "device": args.device,
                  "label": args.model or f"{DEFAULT_MODEL} (default)"}
    result = run_benchmark(model, configs, settings, model_spec=model_spec, progress=not args.no_progress)
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
    else:
        print(format_report(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    if args.plot:
        from ..bench.plot import plot_benchmark

        print(f"wrote {plot_benchmark(result, args.plot)}", file=sys.stderr)
    return 0
