"""``vps ablate``: every configuration of a grid file over one dataset, the model loaded once."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..evaluation.ablation import Equivalence, default_grid_path, equivalent_entries, load_grid
from ..evaluation.methods import MethodSpec
from ..evaluation.rundir import RunDir
from .common import add_data_arguments, add_run_arguments, prompt_from_args
from .eval import execute


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--grid", default=None,
                   help=f"YAML or JSON grid: name -> VPSConfig overrides (and optional method, votes, and config: a "
                        f"VPSConfig file they override, such as a vps tune study's best.json); "
                        f"default: the seed's grid ({default_grid_path().name})")
    p.add_argument("--only", default=None, metavar="NAMES",
                   help="comma-separated subset of the grid's configurations (the baseline is always run); a "
                        "configuration named here runs even when it cannot differ from another")
    p.add_argument("--include-equivalent", action="store_true",
                   help="also run the configurations that cannot differ from an earlier one for their method "
                        "(e.g. no_lbfgs or topk_16 without refinement: --list marks them); skipped by default")
    p.add_argument("--list", action="store_true",
                   help="print the grid's configurations (those --only keeps, with it), marking those that cannot "
                        "differ from another, and exit")
    add_data_arguments(p)
    add_run_arguments(p)


def _stored_configs(out: Path | None) -> set[str]:
    """The configuration names ``out``'s run.json already holds (none when there is no run there yet)."""
    if out is None:
        return set()
    settings = RunDir(out).read_settings()
    return set((settings or {}).get("configs", {}))


def _kept_because(name: str, named: set[str], stored: set[str], include: bool) -> str | None:
    """Why an entry that cannot differ from another still runs (None: it is skipped)."""
    if name in named:
        return "named by --only"
    if include:
        return "--include-equivalent"
    if name in stored:
        # A run started before (or with --include-equivalent) holds it: resuming finishes what it started.
        return "--out's run holds it"
    return None


def run(args: argparse.Namespace) -> int:
    if args.report_only:
        return execute(args, [], "ablate")
    specs = load_grid(args.grid)
    named: set[str] = set()
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(wanted) - {s.name for s in specs})
        if unknown:
            raise ValueError(f"--only: {unknown} not in the grid; it has {[s.name for s in specs]}")
        named = set(wanted)
        specs = [s for s in specs if s.name in wanted or s.method == "base"]
    same = equivalent_entries(specs)
    stored = _stored_configs(args.out)
    kept = {name: _kept_because(name, named, stored, args.include_equivalent) for name in same}
    if args.list:  # what the grid holds (the --only subset, with the baseline), and what would be skipped
        for spec in specs:
            print(_list_line(spec, same, kept))
        return 0
    prompt_from_args(args)  # a bad --prompt / --shots / --system is the only line said (execute checks it again)
    skipped = [name for name, why in kept.items() if why is None]
    if skipped:
        print(f"skipping {len(skipped)} configuration(s) that cannot differ from an earlier one for their method: "
              f"{', '.join(f'{n} (= {same[n].same_as})' for n in skipped)}; --list says why, --include-equivalent "
              f"or --only NAME runs them", file=sys.stderr)
        specs = [s for s in specs if s.name not in skipped]
    if not any(s.method == "base" for s in specs):
        print("note: the grid has no 'method: base' entry; the report will have no comparisons")
    return execute(args, specs, "ablate")


def _list_line(spec: MethodSpec, same: dict[str, Equivalence], kept: dict[str, str | None]) -> str:
    """One line of ``--list``: name, method, the overrides of the defaults, and the equivalence mark."""
    if spec.config is None:
        return f"{spec.name}: {spec.method}"
    defaults = type(spec.config)().to_dict()
    changed = {k: v for k, v in spec.config.to_dict().items() if defaults.get(k) != v}
    line = f"{spec.name}: {spec.method}{' ORACLE' if spec.oracle else ''} {changed or '(defaults)'}"
    if spec.name in same:
        eq = same[spec.name]
        action = f"runs: {kept[spec.name]}" if kept[spec.name] else "skipped"
        line += f"  [= {eq.same_as} for {spec.method}: {eq.why}; {action}]"
    return line
