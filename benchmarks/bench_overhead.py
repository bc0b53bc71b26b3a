#!/usr/bin/env python
"""The standard VPS overhead benchmark (targets in BENCHMARKS.md); ``make bench`` runs it.

Runs ``vps bench`` with its defaults — the bundled model, builders sk / sc / hybrid (frozen decode),
sk with dynamic decode and the rank-2 floor; prefill 1 x 512 and 8 x 128, greedy decode at batch 1
and 8, peak memory — prints the table, writes the full JSON result to
``benchmarks/results/<UTC time>-<device>.json`` and its chart next to it (``.png``, see
`vps.bench.plot`), and appends a one-line summary to ``benchmarks/results/history.jsonl``.

Every ``vps bench`` option passes through, e.g.::

    python benchmarks/bench_overhead.py --threads 1
    python benchmarks/bench_overhead.py --configs sk --repeats 9 --no-memory
    python benchmarks/bench_overhead.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

from vps.commands import bench as bench_command

RESULTS = Path(__file__).resolve().parent / "results"


def summary_line(result: dict, argv: list[str]) -> dict:
    """The figures worth keeping from one run: every ratio, plus what the run was measured on."""
    m = result["machine"]
    ratios = {}
    for name, entry in result["configs"].items():
        ratios[name] = {key: round(s["ratio"], 4) for key, s in entry["workloads"].items()}
        if entry.get("memory") and "ratio" in entry["memory"]:
            ratios[name]["peak_mem"] = round(entry["memory"]["ratio"], 4)
    return {
        "created": result["created"], "argv": argv, "model": result["model"]["name"] or "default",
        "dtype": result["model"]["dtype"], "device": m["device"], "device_name": m["device_name"],
        "threads": m["threads"], "torch": m["torch"], "loadavg_start": m.get("loadavg_start"),
        "loadavg_end": m.get("loadavg_end"), "wall_s": round(result["wall_s"], 1), "ratios": ratios,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="bench_overhead.py", description=__doc__.splitlines()[0])
    bench_command.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.profile:
        return bench_command.run(args)
    if args.out is None:
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        device = (args.device or "auto").replace(":", "")
        args.out = str(RESULTS / f"{stamp}-{device}{'-quick' if args.quick else ''}.json")
    if args.plot is None:
        args.plot = str(Path(args.out).with_suffix(".png"))
    rc = bench_command.run(args)
    if rc == 0:
        result = json.loads(Path(args.out).read_text())
        RESULTS.mkdir(parents=True, exist_ok=True)
        with open(RESULTS / "history.jsonl", "a") as f:
            f.write(json.dumps(summary_line(result, argv)) + "\n")
        print(f"appended a summary to {RESULTS / 'history.jsonl'}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
