"""``vps tune``: a resumable Optuna search for the VPS configuration that lowers gold-solution NLL."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..setting_flags import flag_fields
from ..tuning.settings import TuneSettings
from .common import (
    add_model_arguments,
    add_prompt_arguments,
    add_setting_argument,
    add_threads_argument,
    check_threads,
    load,
    prompt_from_args,
    set_threads,
    setting_values,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=None,
                   help="study directory (required): tune.json, study.db (Optuna, SQLite), base_nll.json, "
                        "trials.jsonl, best.json, report.md, report.png; rerun the same command to resume")
    p.add_argument("--trials", type=int, default=40,
                   help="trials with a verdict (completed, pruned or failed on their own) to reach; a resumed study "
                        "runs only the missing ones (default %(default)s)")
    p.add_argument("--space", default=None,
                   help="search space YAML (default: the bundled vps/grids/tune_space.yaml)")
    g = p.add_argument_group("data (tuning split)")
    g.add_argument("--data", default="gsm8k:train",
                   help="JSONL file or gsm8k:train (default); data holding GSM8K test questions (compared by "
                        "normalised text with the local gsm8k:test file) or named as a test split is refused "
                        "without --allow-test-split")
    g.add_argument("--sample", type=int, default=200, help="seeded sample of N items (default %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="seed of --sample and of the sampler (default 0)")
    g.add_argument("--allow-test-split", action="store_true",
                   help="tune on a test split anyway; every output is labelled TUNED ON TEST DATA")
    g = p.add_argument_group("objective")
    g.add_argument("--objectives", default="nll",
                   help="nll (paired NLL difference, default) or nll,overhead (also the prefill cost ratio: a "
                        "Pareto front, without pruning)")
    fields = {f.name: f for f in flag_fields(TuneSettings)}
    for name in ("pruner", "prune_startup", "prune_warmup", "batch_size"):  # the order --help shows
        add_setting_argument(g, fields.pop(name))
    assert not fields, f"TuneSettings declares flags vps tune does not place: {sorted(fields)}"
    add_prompt_arguments(g)
    add_model_arguments(p)
    add_threads_argument(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def check_single_process() -> None:
    """Refuse a data-parallel launch (``WORLD_SIZE`` > 1): a study runs in one process.

    Scoring one trial across ranks would need every rank's NLLs after each batch before the pruner
    decides, and one trial per process would need the study's trials.jsonl, base_nll.json and the
    marking of cut-off trials (any trial still running when a study opens) shared between writers;
    neither is what the study loop does. See docs/distributed.md.
    """
    from ..evaluation.distributed import world_from_env

    world = world_from_env()
    if world.parallel:
        raise ValueError(f"vps tune runs as one process, and this is rank {world.rank} of a WORLD_SIZE={world.size} "
                         f"launch (a trial's pruning needs all its NLLs in one process, and a study directory has "
                         f"one writer); start it as one process, without torchrun / accelerate launch (on one GPU: "
                         f"CUDA_VISIBLE_DEVICES=0 vps tune ...); docs/distributed.md says why and what else to do")


def _check(args: argparse.Namespace) -> None:
    check_single_process()
    if args.out is None:
        raise ValueError("--out DIR is required (the study's directory; rerun with the same DIR to resume)")
    declared = [(f.metadata["flag"], getattr(args, f.name), f.metadata["low"]) for f in flag_fields(TuneSettings)
                if f.metadata["low"] is not None]
    for flag, value, low in (("--trials", args.trials, 1), ("--sample", args.sample, 1), *declared):
        if value is not None and value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    # The same bounds as vps eval's (its run settings say why), checked before the study writes anything.
    from ..refinement.config import RefineConfigError, check_seed

    try:
        check_seed(args.seed)
    except RefineConfigError as exc:
        raise ValueError(f"--{exc}") from None  # "--seed must be a whole number in ..."
    prompt_from_args(args)  # PromptSettings' rules, worded as vps eval and vps ablate word them
    check_threads(args)
    objectives = [o.strip() for o in args.objectives.split(",") if o.strip()]
    if objectives not in (["nll"], ["nll", "overhead"]):
        raise ValueError(f"--objectives must be nll or nll,overhead, got {args.objectives!r}")
    args.objectives = tuple(objectives)
    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory")
    if out.is_dir() and (out / "run.json").exists():
        raise ValueError(f"--out {out} holds a vps eval run (run.json), not a study; use another directory")


def run(args: argparse.Namespace) -> int:
    _check(args)  # before the imports below (optuna, torch): a bad flag is refused at once
    from .._io import RunLockedError, RunMismatchError, check_resume, read_json_object
    from ..evaluation.data import load_items
    from ..evaluation.settings import data_info
    from ..models import DEFAULT_MODEL
    from ..tuning import TuneSettings, check_split, load_space, run_study
    from ..tuning.files import CONFIRM_GRID, SETTINGS_FILE
    from ..tuning.report import confirm_commands, confirm_grid_commands
    from ..tuning.settings import NOT_COMPARED

    try:
        space = load_space(args.space)
    except ValueError as exc:
        raise ValueError(f"--space: {exc}") from None
    try:
        loaded = load_items(args.data, sample=args.sample, seed=args.seed)
    except (ValueError, FileNotFoundError) as exc:
        raise type(exc)(f"--data: {exc}") from None
    on_test = check_split(args.data, loaded.path, args.allow_test_split, [it.question for it in loaded.items])
    if not loaded.items:
        raise ValueError(f"--data: {loaded.path or args.data} has no items to tune on")
    prompt = prompt_from_args(args)
    settings = TuneSettings(
        model=args.model or DEFAULT_MODEL, data=data_info(loaded, args.data, sample=args.sample, seed=args.seed),
        space=space.to_dict(), dtype=args.dtype, prompt=prompt.style, shots=prompt.shots, system=prompt.system,
        objectives=args.objectives, **setting_values(args, TuneSettings), seed=args.seed, on_test=on_test)
    stored = args.out / SETTINGS_FILE
    if stored.exists():  # refuse a mismatched resume before loading the model
        try:
            stored_settings = read_json_object(stored)
        except RunMismatchError as exc:
            raise ValueError(f"--out {exc}") from None
        check_resume(stored_settings, settings.to_dict(), f"--out {args.out}", stored, kind="study",
                     skip=NOT_COMPARED)
    print(f"data: {len(loaded.items)} items from {loaded.path}" + (" - TUNED ON TEST DATA" if on_test else ""),
          file=sys.stderr)
    set_threads(args)
    model, tok = load(args)
    try:
        result = run_study(model, tok, loaded.items, args.out, settings, space, args.trials,
                           progress=not args.no_progress)
    except RunLockedError as exc:
        raise RunLockedError(f"--out {exc}") from None
    except KeyboardInterrupt:
        print(f"interrupted: finished trials are in {args.out}/study.db; rerun the same command to resume",
              file=sys.stderr)
        return 130
    if result.best_number is None:
        print(f"tune: {result.counted} trial(s) with a verdict, none completed; see {args.out / 'report.md'}")
        return 0
    print(f"tune: {result.counted} trial(s) with a verdict; best is trial {result.best_number}: NLL difference "
          f"{result.best_value:+.4f} nats/token (patched - unpatched)" + (" [TUNED ON TEST DATA]" if on_test else ""))
    print(f"best config: {args.out / 'best.json'}  report: {args.out / 'report.md'}")
    print("confirm on GSM8K test (TUNED ON TEST DATA: this confirmation is not independent of the study):"
          if on_test else "confirm on GSM8K test (never seen by the study):")
    for command in confirm_commands(args.out, settings):
        print(f"  {command}")
    print(f"or with the seed defaults beside it ({CONFIRM_GRID}: base, vps, tuned in one paired run; --out an "
          f"existing --methods base,vps run with the same settings to add only the tuned rows):")
    for command in confirm_grid_commands(args.out, settings):
        print(f"  {command}")
    return 0
