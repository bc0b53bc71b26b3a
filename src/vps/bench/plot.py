"""A picture of a `vps bench` result: each config's ratio to the unpatched model, per workload.

One panel per workload (prefill shapes, decode batches, and peak memory where measured), laid out in a
grid of at most `MAX_COLUMNS` panels per row so the picture stays readable at any number of workloads: a bar per
configuration at its median ratio, a whisker from its fastest to its slowest round (each divided by the
base's median, so the whisker shows how noisy the configuration's own rounds were), a dashed line at
the issue's target where one applies, and a grey line at 1.0 (the unpatched model).

    python -m vps.bench.plot benchmarks/results/<run>.json -o bench.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["MAX_COLUMNS", "plot_benchmark"]

MAX_COLUMNS = 3  # panels per row of the grid


def _panels(result: dict[str, Any]) -> list[dict[str, Any]]:
    panels = []
    base = result["base"]["workloads"]
    for w in result["workloads"]:
        key, rows = w["key"], []
        for name, entry in result["configs"].items():
            s = entry["workloads"][key]
            b = base[key]["median_s"]
            rows.append((name, s["ratio"], s["min_s"] / b, s["max_s"] / b, s.get("target")))
        panels.append({"title": w["label"], "rows": rows})
    mem = [(name, e["memory"]["ratio"], None, None, e["memory"].get("target"))
           for name, e in result["configs"].items() if e.get("memory") and "ratio" in e["memory"]]
    if mem:
        panels.append({"title": "peak memory", "rows": mem, "fmt": ".3f"})
    return panels


def plot_benchmark(result: dict[str, Any], path: str | Path) -> Path:
    """Write the ratio chart of a `run_benchmark` result (or its saved JSON) to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _panels(result)
    if not panels or not result["configs"]:
        raise ValueError("the benchmark result has no configuration to plot")
    n_cfg = len(result["configs"])
    cols = min(MAX_COLUMNS, len(panels))
    rows = -(-len(panels) // cols)
    # A panel's width grows with its bars (0.55 in each, with room for the axis); its height is fixed.
    panel_w = max(3.0, 1.2 + 0.55 * n_cfg)
    fig, axes = plt.subplots(rows, cols, figsize=(panel_w * cols, 0.6 + 3.1 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        names = [r[0] for r in panel["rows"]]
        ratios = [r[1] for r in panel["rows"]]
        xs = range(len(names))
        ax.bar(xs, ratios, color=["#9aa" if n.split(":")[0] == "floor" else "#4878a8" for n in names])
        for x, (_, ratio, lo, hi, _) in zip(xs, panel["rows"], strict=True):
            if lo is not None and hi is not None:
                ax.plot([x, x], [lo, hi], color="black", linewidth=1)
            ax.annotate(f"{ratio:{panel.get('fmt', '.2f')}}", (x, ratio), ha="center", va="bottom", fontsize=8,
                        xytext=(0, 2), textcoords="offset points")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        targets = {r[4] for r in panel["rows"] if r[4] is not None}
        for t in targets:
            ax.axhline(t, color="#c44", linestyle="--", linewidth=1, label=f"target {t:.2f}x")
        if targets:
            ax.legend(fontsize=7, loc="best")
        ax.set_xticks(list(xs), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(panel["title"], fontsize=9)
        lows = [r[2] for r in panel["rows"] if r[2] is not None] + ratios + [1.0]
        highs = [r[3] for r in panel["rows"] if r[3] is not None] + ratios + list(targets)
        ax.set_ylim(max(0.0, min(lows) - 0.1), max(highs) + 0.1)
    for row in axes:
        row[0].set_ylabel("ratio to unpatched", fontsize=8)
    m, md = result["machine"], result["model"]
    quick = " [--quick: smoke test, no targets]" if result.get("settings", {}).get("quick") else ""
    fig.suptitle(f"vps bench: {md.get('name') or '(in-memory model)'}, {md['dtype']}, {m['device']} "
                 f"({m['device_name']}), {m['threads']} thread(s){quick}\n"
                 "bar = median ratio, whisker = fastest-slowest round, dashed = target", fontsize=9)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m vps.bench.plot RESULT.json [-o PNG]``: 0 once written, 2 if the file is no benchmark result."""
    p = argparse.ArgumentParser(prog="python -m vps.bench.plot", description=__doc__.splitlines()[0])
    p.add_argument("result", type=Path, help="JSON written by `vps bench --out` or benchmarks/bench_overhead.py")
    p.add_argument("-o", "--out", type=Path, default=None, help="PNG to write (default: the JSON's path with .png)")
    args = p.parse_args(argv)
    try:
        result = json.loads(args.result.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        print(f"error: cannot read benchmark result {args.result}: {exc}", file=sys.stderr)
        return 2
    try:
        out = plot_benchmark(result, args.out or args.result.with_suffix(".png"))
    except (KeyError, ValueError) as exc:
        print(f"error: {args.result} is not a vps bench result ({exc})", file=sys.stderr)
        return 2
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
