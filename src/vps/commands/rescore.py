"""``vps rescore``: read a finished run's answers again in another extraction mode, without generating."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..verify.extract import EXTRACT_MODES
from .common import out_dir


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="an evaluation directory written by `vps eval` or `vps ablate`")
    p.add_argument("--extract", choices=EXTRACT_MODES, required=True,
                   help="the extraction mode to read the stored outputs with (see docs/verification.md)")
    p.add_argument("--out", type=out_dir, default=None,
                   help="directory for the rescored rows and report (default: RUN-EXTRACT next to RUN); "
                        "rewritten whole on every call")


def run(args: argparse.Namespace) -> int:
    from ..evaluation.report import format_console
    from ..evaluation.rescore import rescore_run
    from ..evaluation.rundir import REPORT_MD

    out = args.out or args.run.with_name(f"{args.run.name}-{args.extract}")
    summary = rescore_run(args.run, out, args.extract)
    rescored = summary["rescored_from"]
    for name, c in rescored["configs"].items():
        print(f"{name}: {c['changed']} of {c['rows']} answers changed; correct {c['correct_before']} "
              f"({rescored['extract_mode']}) -> {c['correct_after']} ({args.extract})")
    print(format_console(summary))
    print(f"wrote {out / REPORT_MD}")
    return 0
