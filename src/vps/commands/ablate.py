"""``vps ablate``: every configuration of a grid file over one dataset, the model loaded once."""

from __future__ import annotations

import argparse

from ..evaluation.ablation import default_grid_path, load_grid
from .common import add_data_arguments, add_run_arguments
from .eval import execute


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--grid", default=None,
                   help=f"YAML or JSON grid: name -> VPSConfig overrides (and optional method, votes, and config: a "
                        f"VPSConfig file they override, such as a vps tune study's best.json); "
                        f"default: the seed's grid ({default_grid_path().name})")
    p.add_argument("--only", default=None, metavar="NAMES",
                   help="comma-separated subset of the grid's configurations (the baseline is always run)")
    p.add_argument("--list", action="store_true",
                   help="print the grid's configurations (those --only keeps, with it) and exit")
    add_data_arguments(p)
    add_run_arguments(p)


def run(args: argparse.Namespace) -> int:
    if args.report_only:
        return execute(args, [], "ablate")
    specs = load_grid(args.grid)
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(wanted) - {s.name for s in specs})
        if unknown:
            raise ValueError(f"--only: {unknown} not in the grid; it has {[s.name for s in specs]}")
        specs = [s for s in specs if s.name in wanted or s.method == "base"]
    if args.list:  # what would run: the --only subset (with the baseline)
        for spec in specs:
            if spec.config is None:
                print(f"{spec.name}: {spec.method}")
                continue
            defaults = type(spec.config)().to_dict()
            changed = {k: v for k, v in spec.config.to_dict().items() if defaults.get(k) != v}
            print(f"{spec.name}: {spec.method}{' ORACLE' if spec.oracle else ''} {changed or '(defaults)'}")
        return 0
    if not any(s.method == "base" for s in specs):
        print("note: the grid has no 'method: base' entry; the report will have no comparisons")
    return execute(args, specs, "ablate")
