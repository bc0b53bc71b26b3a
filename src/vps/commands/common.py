"""Arguments shared by several subcommands: model choice, threads, VPS config overrides, and the data
and run flags of ``vps eval`` and ``vps ablate``."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from ..config import VPSConfig, cli_fields
from ..evaluation.settings import RunSettings, run_flag_fields
from ..prompting import (
    DEFAULT_SHOTS,
    DEFAULT_STYLE,
    PROMPT_STYLES,
    PromptSettingError,
    PromptSettings,
    check_stop_strings,
)
from ..setting_flags import flag_fields


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


# A field's type as the dataclass records it (a string, under `from __future__ import annotations`) -> the
# argparse type that reads its flag's value; any other field is text (str, argparse's own default).
_FLAG_TYPES: dict[Any, Any] = {"int": int, int: int, "float": float, float: float}


def _flag_dest(flag: str) -> str:
    """The attribute argparse stores a flag under (``--decode-mode`` -> ``decode_mode``)."""
    return flag.lstrip("-").replace("-", "_")


def _config_flags() -> dict[str, list[dataclasses.Field[Any]]]:
    """Each VPS configuration flag -> the `VPSConfig` fields it sets, from the fields' metadata: the flags
    that take a value first, then the switches, each in field order (as ``--help`` lists them)."""
    flags: dict[str, list[dataclasses.Field[Any]]] = {}
    for f in sorted(cli_fields(), key=lambda f: "sets" in f.metadata):  # sorted() is stable
        flags.setdefault(f.metadata["flag"], []).append(f)
    return flags


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """``--config`` and one flag per `VPSConfig` field the CLI exposes, built from the fields' metadata
    (flag, help, choices), so the flags say what config.py says."""
    g = p.add_argument_group("VPS configuration (defaults: the seed's)")
    g.add_argument("--config", default=None,
                   help="VPSConfig JSON file (VPSConfig.save) or a directory holding vps_config.json "
                        "(VPSConfig.save_pretrained); the flags below override its fields")
    for flag, fields in _config_flags().items():
        first = fields[0]
        text = first.metadata["help"].format(default=first.default)
        if "sets" in first.metadata:
            g.add_argument(flag, action="store_true", help=text)
        else:
            g.add_argument(flag, type=_FLAG_TYPES.get(first.type, str), choices=first.metadata.get("choices"),
                           help=text)


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


def add_prompt_arguments(g: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--prompt``, ``--shots`` and ``--system``, the fields of `PromptSettings`, as ``vps eval``, ``vps ablate``
    and ``vps tune`` all take them (`prompt_from_args` reads them back)."""
    g.add_argument("--prompt", default=DEFAULT_STYLE, choices=PROMPT_STYLES,
                   help="prompt style: tutor (chat template, step by step, '#### <answer>'), boxed (chat template, "
                        "the Qwen family's 'reason step by step ... within \\boxed{}'), fewshot (lm-eval's plain-text "
                        "'Question: ... Answer:' with --shots solved GSM8K train examples) (default: %(default)s)")
    g.add_argument("--shots", type=int, default=DEFAULT_SHOTS,
                   help="solved examples in a --prompt fewshot prompt (the first of GSM8K train; default: %(default)s)")
    g.add_argument("--system", default=None, help="system prompt of a chat prompt style (default: the style's own)")


# PromptSettings field (as `PromptSettingError` names it) -> the flag that sets it.
PROMPT_FLAGS = {"prompt": "--prompt", "shots": "--shots", "system": "--system"}


def prompt_from_args(args: argparse.Namespace) -> PromptSettings:
    """The `PromptSettings` of ``--prompt``, ``--shots`` and ``--system``; a value that breaks one of its rules
    is a ValueError in the rule's words, after the flag (``--shots must be in [1, 64], got 0``). ``vps eval``,
    ``vps ablate`` and ``vps tune`` call it before they read data, load a model or write anything."""
    try:
        return PromptSettings(args.prompt, args.shots, args.system)
    except PromptSettingError as exc:
        raise ValueError(exc.named(PROMPT_FLAGS[exc.field])) from None


def add_stop_argument(p: argparse.ArgumentParser) -> None:
    """``--stop`` of the one-question commands (``vps generate``, ``vps refine``), read back by `stop_from_args`.
    They prompt through a chat template, whose answers end at the model's end-of-turn token, so by default
    nothing else stops them (``vps eval``'s ``--stop``, a `RunSettings` field, defaults to the few-shot stops)."""
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop string (repeatable): generation ends where one first appears and the text is cut "
                        "there, before the answer is read (default: none; the end-of-turn token ends a chat answer)")


def stop_from_args(args: argparse.Namespace) -> tuple[str, ...]:
    """The ``--stop`` strings, checked (`vps.prompting.check_stop_strings`); a bad one is a ValueError naming
    the flag."""
    try:
        return check_stop_strings(args.stop or [])
    except ValueError as exc:
        raise ValueError(f"--stop: {exc}") from None


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    g = p.add_argument_group("run")
    g.add_argument("--out", type=out_dir, default=None,
                   help="output directory (required): run.json, results.jsonl, report.md, report.png; "
                        "rerun the same command to resume. Locked while a run works in it (.lock)")
    g.add_argument("--batch-size", type=int, default=8, help="prompts per batch (left padded; default 8)")
    g.add_argument("--checkpoint-activations", action="store_true",
                   help="refine methods: recompute the decoder blocks' activations in each refinement step's "
                        "backward instead of keeping them (less memory, one more forward of the blocks per step, "
                        "the same rows)")
    g.add_argument("--baseline-from", type=Path, default=None, metavar="RUN_DIR",
                   help="copy the `base` rows of an earlier run over the same data instead of computing them "
                        "(refused, naming the setting, unless model, dtype, prompt, data file and generation "
                        "settings match; each item's prompt and gold are checked); the report says so")
    fields = {f.name: f for f in run_flag_fields()}
    for name in ("max_new_tokens", "temperature", "stop_strings"):
        add_setting_argument(g, fields.pop(name))
    add_prompt_arguments(g)
    add_setting_argument(g, fields.pop("extract_mode"))
    g.add_argument("--nll", action="store_true", help="also score the gold-solution NLL (one extra forward pair)")
    g.add_argument("--nll-only", action="store_true", help="only the gold-solution NLL, no generation (cheap)")
    for f in fields.values():  # the refine methods' settings, and any setting declared after them
        add_setting_argument(g, f)
    g.add_argument("--report-only", action="store_true", help="only rewrite the report from --out's rows")
    add_threads_argument(g)
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_setting_argument(g: argparse.ArgumentParser | argparse._ArgumentGroup, f: dataclasses.Field[Any]) -> None:
    """The flag of a settings field, from its declaration (`vps.setting_flags.flag_field`): its default, help and
    choices; a repeatable flag defaults to None (not given: the field's default, `setting_values`)."""
    meta = f.metadata
    if meta["repeatable"]:
        g.add_argument(meta["flag"], action="append", default=None, metavar=meta["metavar"], help=meta["help"])
    else:
        g.add_argument(meta["flag"], type=type(f.default), default=f.default, choices=meta["choices"],
                       metavar=meta["metavar"], help=meta["help"])


def setting_values(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of settings class ``cls`` that flags built by `add_setting_argument` set, by field name; a
    repeatable flag not given is left out, so the field keeps its default."""
    values = {f.name: getattr(args, _flag_dest(f.metadata["flag"])) for f in flag_fields(cls)}
    return {name: value for name, value in values.items() if value is not None}


def run_setting_values(args: argparse.Namespace) -> dict[str, Any]:
    """The `RunSettings` fields that ``vps eval`` / ``vps ablate`` flags set (`setting_values`)."""
    return setting_values(args, RunSettings)


def config_flags_given(args: argparse.Namespace) -> list[str]:
    """The VPS configuration flags given on the command line, as typed (for refusing them where they do nothing)."""
    flags = ["--config", *_config_flags()]
    return [flag for flag in flags if getattr(args, _flag_dest(flag)) not in (None, False)]


def config_from_args(args: argparse.Namespace) -> VPSConfig:
    """``--config`` (or the seed defaults) with the given configuration flags applied by
    `VPSConfig.from_overrides`, whose errors start with the flags given."""
    cfg = VPSConfig.load(args.config) if args.config else VPSConfig()
    overrides: dict[str, Any] = {}
    given: list[str] = []
    for flag, fields in _config_flags().items():
        value = getattr(args, _flag_dest(flag))
        if value is None or value is False:
            continue
        if "sets" in fields[0].metadata:  # a switch: sets its fields to the declared value
            overrides.update({f.name: f.metadata["sets"] for f in fields})
            given.append(flag)
        else:
            overrides.update({f.name: value for f in fields})
            given.append(f"{flag} {value}")
    return VPSConfig.from_overrides(overrides, base=cfg, source=" ".join(given)) if overrides else cfg


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
