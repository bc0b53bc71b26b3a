"""The written report of an evaluation directory: report.md, the console table, and `write_report`.

`write_report` writes report.md, summary.json (`vps.evaluation.summary`: the statistics) and report.png
(`vps.evaluation.plot`). Oracle configurations (gold answer used at test time) are labelled ORACLE
wherever they appear.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._io import dumps_strict, write_atomic
from .methods import find_method, registered
from .plot import plot
from .rundir import REPORT_MD, REPORT_PNG, RESULTS_FILE, SUMMARY_JSON
from .summary import load_run, summarize_run

__all__ = ["format_console", "render_markdown", "write_report"]


# -- formatting ------------------------------------------------------------------------------------
def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _pp(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:+.1f} pp"


def _ci(ci: Sequence[float] | None, fmt: str) -> str:
    if ci is None:
        return "—"
    lo, hi = ci
    if fmt == "pct":
        return f"[{100 * lo:.1f}, {100 * hi:.1f}]"
    if fmt == "pp":
        return f"[{100 * lo:+.1f}, {100 * hi:+.1f}]"
    return f"[{lo:+.4f}, {hi:+.4f}]"


def _num(x: float | None, fmt: str = ".4f") -> str:
    return "—" if x is None else format(x, fmt)


def _p(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:.3g}" if x >= 1e-3 else f"{x:.1e}"


def _label(entry: dict[str, Any], markdown: bool = True) -> str:
    name = f"`{entry['name']}`" if markdown else entry["name"]
    if entry["oracle"]:
        name += " **ORACLE**" if markdown else " ORACLE"
    return name


def _n(entry: dict[str, Any], key: str, n_items: int | None) -> str:
    n = entry[key]
    return f"{n}/{n_items} (incomplete)" if n_items is not None and n < n_items else str(n)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines + [""]


def configuration_lines(configs: dict[str, Any]) -> list[str]:
    """report.md's account of the VPS configuration each patched method used: the `VPSConfig` fields it sets
    away from the defaults (values as JSON), or that it is the defaults; empty when no method is patched.

    ``configs`` is run.json's ``configs``. A field missing from a stored configuration (a run written before
    the field existed) took its default, as a resume does, so it is not named.
    """
    from ..config import VPSConfig

    defaults = VPSConfig().to_dict()
    patched = {name: spec["config"] for name, spec in configs.items() if spec.get("config") is not None}
    if not patched:
        return []
    lines = ["- **VPS configuration** of each patched method (fields set away from `VPSConfig`'s defaults; "
             "run.json holds every value):"]
    for name, cfg in patched.items():
        # ``version`` records the library that wrote the configuration and changes no output.
        changed = [f"{key}={json.dumps(value)}" for key, value in cfg.items()
                   if key != "version" and (key not in defaults or defaults[key] != value)]
        lines.append(f"  - `{name}`: {', '.join(changed) if changed else 'the defaults'}")
    return lines


def _rescore_notes(entries: Sequence[dict[str, Any]]) -> list[str]:
    """What ``vps rescore`` kept of the rows of the run's methods (`Method.rescore_note`), each note once, in
    the registry's order."""
    present = {e["method"] for e in entries}
    notes = [m.rescore_note for m in registered() if m.name in present and m.rescore_note is not None]
    return list(dict.fromkeys(notes))


def method_lines(entries: Sequence[dict[str, Any]]) -> list[str]:
    """The registered methods' own lines in report.md's description (`Method.report_lines`): each function
    once, in the registry's order, given the entries (in the run's order) of every method that shares it."""
    lines: list[str] = []
    done: list[Any] = []
    for method in registered():
        write = method.report_lines
        if write is None or any(write is seen for seen in done):
            continue
        done.append(write)
        mine = [e for e in entries if (m := find_method(e["method"])) is not None and m.report_lines is write]
        if mine:
            lines += write(mine)
    return lines


def render_markdown(summary: dict[str, Any], configs: dict[str, Any] | None = None) -> str:
    """report.md: the run's description, then one table per metric."""
    data = summary["data"]
    n_items = summary["n_items"]
    entries = summary["configs"]
    base = summary["baseline"]
    others = [e for e in entries if e["name"] != base]
    sample = (f"seeded sample of {data.get('sample')} (seed {data.get('seed')})" if data.get("sample") is not None
              else "no sampling (file order)")
    lines = ["# Evaluation report", "",
             f"- **Model**: `{summary['model']}` ({summary['dtype']})",
             f"- **Data**: `{data.get('source')}` ({data.get('path')}), n = {n_items} items; {sample}; "
             f"offset {data.get('offset')}, limit {data.get('limit')}; {data.get('skipped', 0)} malformed "
             f"line(s) skipped",
             ]
    if summary["generate"]:
        stops = ", ".join(json.dumps(s) for s in summary.get("stop_strings") or []) or "none"
        decoding = "greedy" if not summary.get("temperature") else f"temperature {summary['temperature']}"
        lines.append(f"- **Decoding**: {decoding}, at most {summary['max_new_tokens']} new tokens, stop at "
                     f"{stops}; answers extracted in {summary['extract_mode']} mode")
    else:
        lines.append("- **NLL only**: no generation (accuracy not measured)")
    if summary["nll"]:
        lines.append("- **NLL**: mean negative log-likelihood (nats/token) of the gold solution text given the "
                     "prompt, teacher-forced; patched models use selectors built from the prompt only")
    boot = summary["bootstrap"]
    if not base:
        lines.append("- **Statistics**: no baseline (method `base`) in this run; no comparisons")
    elif summary["generate"]:
        lines.append(f"- **Statistics**: baseline `{base}`; 95% intervals: Wilson for accuracy, paired bootstrap "
                     f"({boot['resamples']:,} resamples, seed {boot['seed']}) for differences; exact two-sided "
                     f"McNemar p on the discordant pairs; cost ratio = seconds per item / baseline's, "
                     f"on the items both have")
    else:
        lines.append(f"- **Statistics**: baseline `{base}`; 95% paired bootstrap intervals ({boot['resamples']:,} "
                     f"resamples, seed {boot['seed']}) for differences; cost ratio = seconds per item / baseline's, "
                     f"on the items both have")
    rescored = summary.get("rescored_from")
    if rescored:
        notes = "".join(f"; {note}" for note in _rescore_notes(entries))
        lines.append(f"- **Rescored**: answers read again in {summary['extract_mode']} mode from the outputs stored in "
                     f"`{rescored['dir']}` (read there in {rescored['extract_mode']} mode); nothing was generated "
                     f"again" + notes)
    for e in entries:
        if fb := e.get("fallbacks"):
            partial = f" (of the {fb['rows']} rows that record it)" if fb["rows"] < e["rows"] else ""
            lines.append(f"- **Fallbacks**: `{e['name']}`: {fb['items_with_any']} of {fb['rows']} items "
                         f"({100 * fb['items_with_any'] / fb['rows']:.1f}%){partial} had at least one layer fall back "
                         f"to the base output ({fb['total']} fallbacks in all); those items were partly the "
                         f"unpatched model")
    for name, record in (summary.get("imported") or {}).items():
        lines.append(f"- **Imported rows**: {record['rows']} `{name}` row(s) copied from `{record['from']}` (same "
                     f"settings and items, checked), not computed in this run; their seconds were measured there")
    lines += method_lines(entries)
    if any(e["oracle"] for e in entries):
        names = ", ".join(f"`{e['name']}`" for e in entries if e["oracle"])
        lines.append(f"- **ORACLE**: {names} read the gold answer at test time (the label they are scored on); "
                     f"their numbers are an upper bound, not comparable with gold-free methods")
    lines += configuration_lines(configs or {})
    lines.append("")

    if rescored:
        lines += _rescore_table(summary)
    if summary["generate"]:
        lines += ["## Accuracy", ""]
        lines += _table(["config", "method", "n", "correct", "accuracy", "95% CI (Wilson)"], [
            [_label(e), e["method"] or "", _n(e, "n_scored", n_items), _num(e["correct"], "d"),
             _pct(e["accuracy"]), _ci(e["accuracy_ci"], "pct")] for e in entries])
        if base and others:
            lines += ["## Accuracy difference vs baseline", ""]
            rows = []
            for e in others:
                v = e["vs_baseline"] or {}
                rows.append([_label(e), e["method"] or "", _num(v.get("n"), "d"), _pp(v.get("accuracy_diff")),
                             _ci(v.get("accuracy_diff_ci"), "pp"), _p(v.get("mcnemar_p")),
                             _num(v.get("flips_to_correct"), "d"), _num(v.get("flips_to_wrong"), "d")])
            lines += _table(["config", "method", "n paired", "diff", "95% CI (bootstrap)", "McNemar p",
                             "flips to correct", "flips to wrong"], rows)
    if summary["nll"]:
        lines += ["## Gold-solution NLL (nats/token, lower is better)", ""]
        rows = []
        for e in entries:
            v = e["vs_baseline"] or {}
            rows.append([_label(e), e["method"] or "", _n(e, "n_nll", n_items), _num(e["nll_mean"]),
                         _num(v.get("nll_diff"), "+.4f"), _ci(v.get("nll_diff_ci"), "nll")])
        lines += _table(["config", "method", "n", "mean NLL", "diff vs baseline", "95% CI (bootstrap)"], rows)
    lines += _reference_table(summary)
    lines += _versus_table(summary)
    lines += ["## Cost", ""]
    # Runs that draw samples weigh compute: their entries carry model passes (`summarize_run`).
    passes = any("passes" in e for e in entries)
    rows = []
    for e in entries:
        v = e["vs_baseline"] or {}
        if summary["generate"]:
            cells = [_num(e["seconds_mean"], ".3f"), _num(e["tokens_mean"], ".1f")]
            if passes:
                p = e.get("passes") or {}
                cells += [_num(p.get("forward_mean"), ".1f"), _num(p.get("backward_mean"), ".1f")]
            cells += [_num(e["nll_seconds_mean"], ".3f")] if summary["nll"] else []
        else:
            cells = [_num(e["seconds_mean"], ".3f")]
        rows.append([_label(e), e["method"] or "", *cells, _num(v.get("cost_ratio"), ".2f")])
    if summary["generate"]:
        header = ["s/item (generation)", "tokens/item",
                  *(["forward passes/item", "backward passes/item"] if passes else []),
                  *(["NLL s/item"] if summary["nll"] else [])]
    else:
        header = ["s/item (NLL pass)"]
    lines += _table(["config", "method", *header, "cost ratio"], rows)
    lines.append("Seconds are each batch's wall time divided among its items; the cost ratio compares "
                 + ("generation" if summary["generate"] else "the NLL pass")
                 + " time per item with the baseline's on the items both have (so it can differ from the ratio of "
                 "the s/item column, which averages each configuration over its own items while a run is "
                 "incomplete)."
                 + (" The NLL pass of a patched configuration includes its prompt-only prefill (one more forward "
                    "over the prompt than the baseline)." if summary["nll"] else "")
                 + (f" {PASSES_NOTE}" if passes else "")
                 + f" Plot: `{REPORT_PNG}`; per-item rows: `{RESULTS_FILE}`.")
    return "\n".join(lines) + "\n"


# How report.md counts model passes (`Method.passes`), said under the cost table wherever it shows them.
PASSES_NOTE = ("Forward passes count one per generated token (the first from the prompt's prefill, the rest decode "
               "steps, over every sample and iteration) plus one per refinement surrogate step, which also runs one "
               "backward pass; a surrogate step's forward and backward cover the whole prompt and its target, so "
               "they cost more than a decode step.")


def _versus_table(summary: dict[str, Any]) -> list[str]:
    """Refinement against voting on their paired items (`summarize_run`'s ``versus``), where the run has both."""
    versus = summary.get("versus")
    if not versus:
        return []
    rows = [[f"`{c['refine']}`", f"`{c['vote']}`", _num(c["n"], "d"), _pct(c["refine_accuracy"]),
             _pct(c["vote_accuracy"]), _pp(c["accuracy_diff"]), _ci(c["accuracy_diff_ci"], "pp"), _p(c["mcnemar_p"]),
             _num(c["refine_only_correct"], "d"), _num(c["vote_only_correct"], "d"),
             _num(c["forward_ratio"], ".2f"), _num(c["seconds_ratio"], ".2f")] for c in versus]
    return ["## Refinement against voting", "",
            *_table(["refinement", "voting", "n paired", "refinement accuracy", "voting accuracy",
                     "diff (refinement - voting)", "95% CI (bootstrap)", "McNemar p", "only refinement correct",
                     "only voting correct", "forward passes ratio", "seconds ratio"], rows),
            "Ratios are refinement's per item over voting's on the paired items (above 1: refinement spent more). "
            "Equal compute means a ratio near 1; refinement that spends more and is not better does not beat voting.",
            ""]


def _rescore_table(summary: dict[str, Any]) -> list[str]:
    rescored = summary["rescored_from"]
    before, after = rescored["extract_mode"], summary["extract_mode"]
    labels = {e["name"]: _label(e) for e in summary["configs"]}
    rows = [[labels.get(name, f"`{name}`"), _num(c["rows"], "d"), _num(c["changed"], "d"),
             _num(c["correct_before"], "d"), _num(c["correct_after"], "d")]
            for name, c in rescored["configs"].items()]
    return ["## Re-extraction", "", *_table(["config", "outputs", "answers changed", f"correct ({before})",
                                             f"correct ({after})"], rows)]


def _reference_table(summary: dict[str, Any]) -> list[str]:
    ref = summary.get("reference")
    compared = [e for e in summary["configs"] if e.get("vs_reference")]
    if not ref or not compared:
        return []
    header, rows = ["config", "n paired"], []
    if summary["nll"]:
        header += ["NLL diff", "95% CI (bootstrap)"]
    if summary["generate"]:
        header += ["accuracy diff", "95% CI (bootstrap)", "McNemar p"]
    for e in compared:
        v = e["vs_reference"]
        row = [_label(e), _num(v.get("n"), "d")]
        if summary["nll"]:
            row += [_num(v.get("nll_diff"), "+.4f"), _ci(v.get("nll_diff_ci"), "nll")]
        if summary["generate"]:
            row += [_pp(v.get("accuracy_diff")), _ci(v.get("accuracy_diff_ci"), "pp"), _p(v.get("mcnemar_p"))]
        rows.append(row)
    return [f"## Difference vs `{ref}` (same statistics, `{ref}` as the reference)", "", *_table(header, rows)]


def format_console(summary: dict[str, Any]) -> str:
    """A compact plain-text table for the terminal; oracle configurations say ORACLE."""
    header = ["config", "n", "accuracy [95% CI]", "diff [95% CI]", "McNemar p", "NLL", "NLL diff [95% CI]", "cost"]
    rows = []
    for e in summary["configs"]:
        v = e["vs_baseline"] or {}
        acc = "—" if e["accuracy"] is None else f"{_pct(e['accuracy'])} {_ci(e['accuracy_ci'], 'pct')}"
        diff = ("—" if v.get("accuracy_diff") is None
                else f"{_pp(v['accuracy_diff'])} {_ci(v['accuracy_diff_ci'], 'pp')}")
        nll_diff = "—" if v.get("nll_diff") is None else f"{v['nll_diff']:+.4f} {_ci(v['nll_diff_ci'], 'nll')}"
        cost = "—" if v.get("cost_ratio") is None else f"{v['cost_ratio']:.2f}x"
        rows.append([_label(e, markdown=False), str(e["rows"]), acc, diff, _p(v.get("mcnemar_p")),
                     _num(e["nll_mean"]), nll_diff, cost])
    # drop columns with nothing in them (accuracy in NLL-only runs, NLL without --nll)
    keep = [i for i in range(len(header)) if i < 2 or any(r[i] not in ("—", "") for r in rows)]
    header = [header[i] for i in keep]
    rows = [[r[i] for i in keep] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def write_report(out_dir: str | Path) -> dict[str, Any]:
    """Write report.md, report.png and summary.json into ``out_dir`` from its rows; returns the summary.

    summary.json is strict JSON: null stands for a number that does not exist (no rows, no data, a
    statistic that is not finite), never NaN.
    """
    out_dir = Path(out_dir)
    settings, rows = load_run(out_dir)
    summary = summarize_run(settings, rows)
    (out_dir / REPORT_MD).write_text(render_markdown(summary, settings.get("configs")), encoding="utf-8")
    # Strict JSON: a statistic that is not finite (no data, no evidence) is null.
    write_atomic(out_dir / SUMMARY_JSON, dumps_strict(summary, fallback=_nan_safe, indent=2) + "\n")
    plot(summary, out_dir / REPORT_PNG)
    return summary


def _nan_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)
