"""Arguments shared by several subcommands: model choice, threads, VPS config overrides, and the data
and run flags of ``vps eval`` and ``vps ablate``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..config import BUILDERS, DECODE_MODES, GAMMA_MAX, VPSConfig
from ..prompting import DEFAULT_STOP_STRINGS, PROMPT_STYLES
from ..verify.extract import EXTRACT_MODES

_SEED = VPSConfig()


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="alias (smollm2-135m, qwen2.5-coder-0.5b, qwen2.5-coder-1.5b), local dir, .gguf file or "
                        "hub id; default: the bundled SmolLM2-135M-Instruct")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None,
                   help="torch device (default: cuda if available, else cpu; vps eval under torchrun / accelerate "
                        "launch: cuda:LOCAL_RANK)")
    p.add_argument("--device-map", default=None, metavar="MAP",
                   help="let accelerate place the model instead of --device: auto, balanced, balanced_low_0, "
                        "sequential, or a JSON file {module name: device | \"cpu\" | \"disk\"} (sharding over "
                        "GPUs, CPU / disk offload; VPS runs inside each layer's device hook)")
    p.add_argument("--offload-folder", default=None, metavar="DIR",
                   help="where --device-map's \"disk\" entries keep their weights")


def add_threads_argument(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--threads``, on a parser or one of its argument groups."""
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice); on a shared machine give concurrent jobs 1 "
                        "each, which avoids the large slowdown of oversubscribed cores")


# torch keeps the thread count in a C int; far beyond any machine, a count fails there with "Overflow when
# unpacking long long", which names no flag.
MAX_THREADS = 1024


def check_threads(args: argparse.Namespace) -> None:
    """Refuse a ``--threads`` outside [1, `MAX_THREADS`] (before any data or model is loaded)."""
    if args.threads is not None and not 1 <= args.threads <= MAX_THREADS:
        raise ValueError(f"--threads must be in [1, {MAX_THREADS}], got {args.threads}")


def out_dir(text: str) -> Path:
    """``--out`` as argparse reads it: an empty value is refused, not taken as the current directory."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must name a directory, got an empty value")
    return Path(text)


def set_threads(args: argparse.Namespace) -> None:
    """Apply ``--threads`` (validated) before anything heavy runs."""
    check_threads(args)
    if args.threads is None:
        return
    import torch

    torch.set_num_threads(args.threads)


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("VPS configuration (defaults: the seed's)")
    g.add_argument("--config", default=None,
                   help="VPSConfig JSON file (VPSConfig.save) or a directory holding vps_config.json "
                        "(VPSConfig.save_pretrained); the flags below override its fields")
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


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default="gsm8k:test",
                   help="JSONL file, or gsm8k:test / gsm8k:train (the local copy); default gsm8k:test")
    g.add_argument("--question-field", default="question", help="JSON key of the question (default: question)")
    g.add_argument("--answer-field", default="answer",
                   help="JSON key of the gold solution, '#### n' or a bare answer (default: answer)")
    g.add_argument("--limit", type=int, default=None, help="keep at most N items (applied last)")
    g.add_argument("--offset", type=int, default=0, help="skip the first N items (after --sample)")
    g.add_argument("--sample", type=int, default=None, help="a seeded random sample of N items (kept in file order)")
    g.add_argument("--seed", type=int, default=0, help="seed of --sample, generation and refinement (default 0)")


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    g = p.add_argument_group("run")
    g.add_argument("--out", type=out_dir, default=None,
                   help="output directory (required): run.json, results.jsonl, report.md, report.png; "
                        "rerun the same command to resume. Locked while a run works in it (.lock)")
    g.add_argument("--batch-size", type=int, default=8, help="prompts per batch (left padded; default 8)")
    g.add_argument("--baseline-from", type=Path, default=None, metavar="RUN_DIR",
                   help="copy the `base` rows of an earlier run over the same data instead of computing them "
                        "(refused, naming the setting, unless model, dtype, prompt, data file and generation "
                        "settings match; each item's prompt and gold are checked); the report says so")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop string, non-empty (repeatable); default: "
                        + ", ".join(repr(s) for s in DEFAULT_STOP_STRINGS))
    g.add_argument("--prompt", default="tutor", choices=PROMPT_STYLES,
                   help="prompt style: tutor (chat template, step by step, '#### <answer>'), boxed (chat template, "
                        "the Qwen family's 'reason step by step ... within \\boxed{}'), fewshot (lm-eval's plain-text "
                        "'Question: ... Answer:' with --shots solved GSM8K train examples) (default: %(default)s)")
    g.add_argument("--shots", type=int, default=5,
                   help="solved examples in a --prompt fewshot prompt (the first of GSM8K train; default: %(default)s)")
    g.add_argument("--system", default=None, help="system prompt of a chat prompt style (default: the style's own)")
    g.add_argument("--extract", choices=EXTRACT_MODES, default="flexible",
                   help="answer extraction: flexible (first ####, else boxed / 'answer is' / last number), strict "
                        "(#### only) or last (the last marker of any kind); see docs/verification.md")
    g.add_argument("--nll", action="store_true", help="also score the gold-solution NLL (one extra forward pair)")
    g.add_argument("--nll-only", action="store_true", help="only the gold-solution NLL, no generation (cheap)")
    g.add_argument("--iters", type=int, default=3, help="refinement iterations (refine methods; >= 1)")
    g.add_argument("--k-samples", type=int, default=4,
                   help="samples for self-consistency (refine methods; >= 1 when a refine method runs, since 0 would "
                        "skip self-consistency)")
    g.add_argument("--report-only", action="store_true", help="only rewrite the report from --out's rows")
    add_threads_argument(g)
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


# The flags add_config_arguments defines, by attribute: each given one changes the VPSConfig config_from_args builds.
_CONFIG_FLAGS = {"config": "--config", "rank": "--rank", "topk": "--topk", "gamma": "--gamma", "tau": "--tau",
                 "builder": "--builder", "order": "--order", "decode_mode": "--decode-mode",
                 "no_qk_coupling": "--no-qk-coupling", "fixed": "--fixed"}
_FIELD_FLAGS = ("rank", "topk", "gamma", "tau", "builder", "order")  # set a VPSConfig field of the same name


def config_flags_given(args: argparse.Namespace) -> list[str]:
    """The VPS configuration flags given on the command line, as typed (for refusing them where they do nothing)."""
    return [flag for name, flag in _CONFIG_FLAGS.items() if getattr(args, name) not in (None, False)]


def config_from_args(args: argparse.Namespace) -> VPSConfig:
    cfg = VPSConfig.load(args.config) if args.config else VPSConfig()
    overrides: dict[str, Any] = {}
    for name in _FIELD_FLAGS:
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.decode_mode:
        overrides["decode_mode"] = args.decode_mode
    if args.no_qk_coupling:
        overrides["qk_coupling"] = False
    if args.fixed:
        overrides.update(adaptive_rank=False, adaptive_gamma=False)
    return cfg.with_overrides(**overrides) if overrides else cfg


def load(args: argparse.Namespace):
    import torch

    from ..models import load_model

    dtype = getattr(torch, args.dtype)
    device_map = parse_device_map(getattr(args, "device_map", None), getattr(args, "offload_folder", None),
                                  args.device)
    if device_map is not None:
        return load_model(args.model, dtype=dtype, device_map=device_map, offload_folder=args.offload_folder)
    device = args.device or ("cuda" if torch.cuda.is_available() else None)
    check_device(device)
    return load_model(args.model, dtype=dtype, device=device)


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def parse_device_map(text: str | None, offload_folder: str | None,
                     device: str | None = None) -> str | dict[str, Any] | None:
    """``--device-map``: a strategy name or a JSON file's {module: device} dict; ValueError naming the flag
    (also when ``--device`` is given beside it)."""
    if text is None:
        if offload_folder is not None:
            raise ValueError("--offload-folder is only used with --device-map")
        return None
    if device is not None:
        raise ValueError("--device-map places the model itself: drop --device")
    if text in DEVICE_MAP_STRATEGIES:
        return text
    path = Path(text)
    if not path.is_file():
        raise ValueError(f"--device-map: expected one of {', '.join(DEVICE_MAP_STRATEGIES)} or a JSON file, "
                         f"got {text!r} (no such file)")
    try:
        mapping = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"--device-map {text}: not valid JSON ({exc})") from None
    if not isinstance(mapping, dict) or not mapping or not all(
            isinstance(k, str) and isinstance(v, (str, int)) for k, v in mapping.items()):
        raise ValueError(f"--device-map {text}: expected a JSON object of module name -> device "
                         "(a device string, a GPU index, \"cpu\" or \"disk\")")
    if "disk" in mapping.values() and offload_folder is None:
        raise ValueError(f"--device-map {text} sends modules to \"disk\": pass --offload-folder")
    return mapping


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
