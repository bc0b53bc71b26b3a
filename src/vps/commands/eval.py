"""``vps eval``: base / vps / refine methods over a dataset, resumable, with a statistics report.

The checks and the run itself (`execute`) are shared with ``vps ablate``, as are the data and run flags
(`vps.commands.common`). Under ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE`` > 1) every process is
one rank of a data-parallel run (`vps.evaluation.distributed`): it evaluates its share of the items on its
own device, and rank 0 merges the rows and writes the report.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._io import RunLockedError, check_directory
from ..evaluation.data import load_items
from ..evaluation.distributed import Shard, World, rank_device, rank_session, world_from_env
from ..evaluation.methods import MethodSpec, find_method, registered
from ..evaluation.rundir import RESULTS_FILE, RunDir, merge_settings, run_record
from .common import (
    add_config_arguments,
    add_data_arguments,
    add_run_arguments,
    check_threads,
    config_from_args,
    load,
    parse_device_map,
    prompt_from_args,
    run_setting_values,
    set_threads,
)

if TYPE_CHECKING:
    from ..evaluation.settings import RunSettings
# The harness (torch) and the report (numpy, scipy, matplotlib) load when a command runs, not when the
# parser is built: `vps --help` stays instant.


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_data_arguments(p)
    p.add_argument("--methods", default="base,vps",
                   help=f"comma-separated, from {method_choices()} (default base,vps); K is the number of "
                        f"sampled completions a majority vote counts (e.g. maj@4); refine-oracle reads the gold "
                        f"answer and is labelled ORACLE")
    add_run_arguments(p)
    add_config_arguments(p)


def method_choices() -> str:
    """The ``--methods`` names as they are written, from the registry: those that take votes with their ``@K``."""
    return ", ".join(m.name + "@K" if m.votes else m.name for m in registered())


def parse_methods(text: str, args: argparse.Namespace) -> list[MethodSpec]:
    """``--methods`` -> specs; ``maj@K`` / ``vps-maj@K`` are majority votes over K sampled completions."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    choices = method_choices()
    parsed = []
    for name in names:
        method, at, k = name.partition("@")
        family = find_method(method)
        if family is None or bool(at) != family.votes or (at and not k.isdigit()):
            raise ValueError(f"--methods: unknown method {name!r}; choose from {choices} (K a whole number)")
        parsed.append((name, family, int(k) if at else None))
    if not names:
        raise ValueError(f"--methods: no method given; choose from {choices}")
    if len(set(names)) != len(names):
        raise ValueError(f"--methods lists a method twice: {names}")
    cfg = config_from_args(args)
    return [MethodSpec(name, family.name, cfg if family.patched else None, votes=k) for name, family, k in parsed]


def report(out: Path) -> int:
    from ..evaluation.report import format_console, write_report
    from ..evaluation.rundir import REPORT_MD, REPORT_PNG

    summary = write_report(out)
    print(format_console(summary))
    print(f"report: {out / REPORT_MD}  plot: {out / REPORT_PNG}  rows: {out / RESULTS_FILE}", file=sys.stderr)
    return 0


@contextlib.contextmanager
def flag_errors() -> Iterator[None]:
    """A `SettingError` re-raised as a ValueError naming the flag of its field (`flag_of`), so an invalid value
    is named as the user typed it; the prompt's fields are checked before, by `prompt_from_args`."""
    from ..evaluation.settings import SettingError, flag_of

    try:
        yield
    except SettingError as exc:
        flag = flag_of(exc.field)
        raise ValueError(f"{flag}: {exc}" if flag else str(exc)) from None


def check_flags(args: argparse.Namespace, specs: list[MethodSpec]) -> None:
    """The flags that need no data nor model, checked first."""
    if args.nll_only and any(s.samples for s in specs):
        raise ValueError("--nll-only cannot run refine or majority-vote methods (they are scored by generation)")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.checkpoint_activations and not any(s.refines for s in specs):
        raise ValueError("--checkpoint-activations applies to the refine methods' steps (refine-self, refine-oracle), "
                         "and this run has none; drop it")
    check_threads(args)
    if parse_device_map(args.device_map, args.offload_folder, args.device) is not None:
        if world_from_env().parallel:
            raise ValueError("--device-map under a launcher: each process would spread its model over every GPU; "
                             "run data-parallel with one device per process, or one process with --device-map")
    for flag, value in (("--limit", args.limit), ("--sample", args.sample), ("--offset", args.offset)):
        if value is not None and value < 0:
            raise ValueError(f"{flag} must be >= 0, got {value}")
    prompt_from_args(args)  # --prompt, --shots, --system: PromptSettings' rules, worded as vps tune words them


def check_out(out: Path) -> RunDir:
    """``--out`` as a run directory this run may write to (ValueError naming --out otherwise)."""
    run = RunDir(out)
    try:
        run.check_target()
    except ValueError as exc:
        raise type(exc)(f"--out {exc}") from None
    return run


def load_data(args: argparse.Namespace) -> Any:
    """``--data`` with its selection; an empty selection is an error saying why."""
    kw = dict(question_field=args.question_field, answer_field=args.answer_field)
    try:
        loaded = load_items(args.data, **kw, limit=args.limit, offset=args.offset, sample=args.sample,
                            seed=args.seed)
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise ValueError(f"--data {args.data}: cannot be read as a JSONL file ({exc})") from None
    except (ValueError, FileNotFoundError) as exc:
        raise type(exc)(f"--data: {exc}") from None
    print(f"data: {len(loaded.items)} items from {loaded.path}; {len(loaded.skipped)} malformed line(s) skipped"
          + (" (listed above)" if loaded.skipped else ""), file=sys.stderr)
    if loaded.items:
        return loaded
    where = loaded.path or args.data
    chosen = [f"{flag} {value}" for flag, value in (("--sample", args.sample), ("--offset", args.offset or None),
                                                     ("--limit", args.limit)) if value is not None]
    if chosen:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            total = len(load_items(args.data, **kw).items)
        if total:
            raise ValueError(f"no items to evaluate: {' '.join(chosen)} select(s) none of the {total} items "
                             f"of {where}")
    malformed = f" ({len(loaded.skipped)} malformed line(s) skipped)" if loaded.skipped else ""
    raise ValueError(f"--data: {where} has no items to evaluate{malformed}")


def execute(args: argparse.Namespace, specs: list[MethodSpec], command: str) -> int:
    """Check every flag, the data's items and the output directory, then lock the directory, load the
    model once, run every spec and write the report. Nothing is written before every check passed."""
    if args.out is None:
        raise ValueError("--out DIR is required (the run's directory; rerun with the same DIR to resume)")
    world = world_from_env()  # a malformed launch is refused before anything else
    if args.report_only:
        try:
            check_directory(args.out)
        except ValueError as exc:
            raise type(exc)(f"--out {exc}") from None
        return report(args.out) if world.rank == 0 else 0
    from ..evaluation.checks import check_run
    from ..evaluation.settings import RunSettings, data_info

    check_flags(args, specs)
    run = check_out(args.out)
    loaded = load_data(args)
    from ..models import DEFAULT_MODEL

    prompt = prompt_from_args(args)
    with flag_errors():
        settings = RunSettings(
            model=args.model or DEFAULT_MODEL, dtype=args.dtype,
            data=data_info(loaded, args.data, args.question_field, args.answer_field, args.limit, args.offset,
                           args.sample, args.seed),
            generate=not args.nll_only, nll=args.nll or args.nll_only, **run_setting_values(args),
            system=prompt.system, prompt=prompt.style, shots=prompt.shots, seed=args.seed, command=command)
        check_run(loaded.items, specs, settings)
    if args.baseline_from is not None:  # refused before the model loads
        from ..evaluation.baseline import check_source

        check_source(args.baseline_from, run_record(settings, specs))
    stored = run.read_settings()
    if stored is not None:  # refuse before spending time on the model
        merge_settings(stored, run_record(settings, specs), str(args.out))
    for spec in specs:
        if spec.oracle:
            print(f"note: {spec.name} is an ORACLE method (uses the gold answer at test time)", file=sys.stderr)
    with contextlib.ExitStack() as held:
        try:  # held for the whole run, released however it ends
            shard = held.enter_context(rank_session(run, world))
        except RunLockedError as exc:
            raise RunLockedError(f"--out {exc}") from None
        except ValueError as exc:
            raise type(exc)(f"--out {exc}") from None
        return _execute_locked(args, specs, run, loaded, settings, world, shard)


def _execute_locked(args: argparse.Namespace, specs: list[MethodSpec], run: RunDir, loaded: Any,
                    settings: RunSettings, world: World | None = None, shard: Shard | None = None) -> int:
    from ..evaluation.harness import run_evaluation

    stored = run.read_settings()  # again, under the lock: another run may have started here meanwhile
    if stored is not None:
        merge_settings(stored, run_record(settings, specs), str(args.out))
    world = world if world is not None else World()
    set_threads(args)
    if world.parallel:  # one GPU per process on its machine
        args.device = rank_device(args.device, world.local_rank)
    model, tok = load(args)
    print(f"model: {settings.model} loaded in {getattr(model, 'vps_load_seconds', float('nan')):.2f} s"
          + (f" on {args.device or 'cpu'} (rank {world.rank} of {world.size})" if world.parallel else ""),
          file=sys.stderr)
    try:
        run_evaluation(model, tok, loaded.items, specs, args.out, settings, batch_size=args.batch_size,
                       progress=not args.no_progress, shard=shard, baseline_from=args.baseline_from,
                       checkpoint_activations=args.checkpoint_activations)
    except KeyboardInterrupt:
        rows = args.out / RESULTS_FILE if shard is None else run.for_rank(shard.rank).results
        print(f"interrupted: finished batches are in {rows}; rerun the same command to resume"
              + ("" if shard is None else " (with any number of processes)"), file=sys.stderr)
        return 130
    if shard is not None and not shard.primary:
        print(f"rank {shard.rank} of {shard.size}: done; rank 0 merges the rows into {args.out / RESULTS_FILE} "
              f"and writes the report", file=sys.stderr)
        return 0
    return report(args.out)


def run(args: argparse.Namespace) -> int:
    specs = [] if args.report_only else parse_methods(args.methods, args)
    return execute(args, specs, "eval")
