"""report.png: a run's differences from its baseline (accuracy, gold-solution NLL) with their 95% intervals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["plot"]


def plot(summary: dict[str, Any], path: str | Path) -> None:
    """report.png: accuracy difference (and NLL difference) vs the baseline, with 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    compared = [e for e in summary["configs"] if e["vs_baseline"]]
    panels = []
    if summary["generate"] and any(e["vs_baseline"].get("accuracy_diff") is not None for e in compared):
        panels.append(("accuracy_diff", "accuracy_diff_ci", 100.0, "accuracy − baseline (percentage points)"))
    if summary["nll"] and any(e["vs_baseline"].get("nll_diff") is not None for e in compared):
        panels.append(("nll_diff", "nll_diff_ci", 1.0, "gold-solution NLL − baseline (nats/token)"))
    height = max(2.5, 0.35 * len(compared) + 1.5)
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(6.0 * max(1, len(panels)), height), squeeze=False)
    title = (f"{summary['model']} on {summary['data'].get('source')}, n = {summary['n_items']}"
             + (f" (sample seed {summary['data'].get('seed')})" if summary["data"].get("sample") else "")
             + f"; baseline: {summary['baseline']}"
             + (f"; answers re-read in {summary['extract_mode']} mode" if summary.get("rescored_from") else ""))
    if not panels:
        ax = axes[0][0]
        ax.axis("off")
        ax.text(0.5, 0.5, "no comparison with a baseline in this run", ha="center", va="center")
    labels = [e["name"] + (" (ORACLE)" if e["oracle"] else "") for e in compared]
    ys = list(range(len(compared)))[::-1]
    for ax, (key, ci_key, scale, xlabel) in zip(axes[0], panels, strict=False):
        for y, e in zip(ys, compared, strict=True):
            v = e["vs_baseline"]
            if v.get(key) is None:
                continue
            x = v[key] * scale
            lo, hi = (c * scale for c in v[ci_key])
            ax.errorbar([x], [y], xerr=[[x - lo], [hi - x]], fmt="o", capsize=3,
                        color="tab:red" if e["oracle"] else "tab:blue")
        ax.axvline(0.0, color="0.5", lw=1, ls="--")
        ax.set_yticks(ys)
        ax.set_yticklabels(labels)
        ax.set_xlabel(xlabel)
        ax.grid(axis="x", alpha=0.3)
        for tick, e in zip(ax.get_yticklabels(), compared, strict=True):
            if e["oracle"]:
                tick.set_color("tab:red")
    fig.suptitle(title + "\n95% paired bootstrap intervals", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
