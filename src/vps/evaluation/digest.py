"""RESULTS.md from evaluation directories: every number comes from a run's own rows.

An index file (YAML or JSON) lists the runs to publish::

    title: Results
    intro: |
      Free text (what was run, on what machine). No numbers: those come from the runs.
    sections:
      - title: Gold-solution NLL, SmolLM2-135M-Instruct, n = 250
        dir: results/smollm2-nll-n250
        command: vps eval --data gsm8k:test --sample 250 --seed 0 --methods base,vps --nll-only ...
        preliminary: false
        note: optional free text
        verdict: SmolLM2-135M-Instruct   # optional: this run's `vps` row is evidence for that model's verdict
        versus: SmolLM2-135M-Instruct    # optional: its refinement-against-voting comparison joins that verdict

For each section the report is rewritten from the directory's rows (`write_report`), its status
(complete, or how many rows each configuration still lacks) and one finding per configuration are
derived from the statistics, and the run's ``report.md`` is embedded below the command. Sections
with a ``verdict`` (a model's name) feed the top of the file: per model, one sentence on whether VPS
(its ``vps`` configuration) helps, hurts or does nothing measurable, from those runs' statistics, and
how a ``tuned`` configuration in the same runs fares (a `vps tune` study's best, added by its
``confirm.yaml``; once all its test rows are in, confirmed only where its NLL interval lies below 0);
sections with ``versus`` add whether refinement beats voting at equal compute (`against_voting`).
Run
``python -m vps.evaluation.digest results/index.yaml -o RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .. import strict_yaml
from .report import write_report
from .rundir import REPORT_MD, REPORT_PNG, RESULTS_FILE, RUN_FILE

__all__ = ["ResultsIndexError", "against_voting", "build_results", "finding", "load_index"]


class ResultsIndexError(ValueError):
    """A malformed results index (the message names the file and the field)."""


def load_index(path: str | Path) -> dict[str, Any]:
    """The index at ``path`` (YAML or JSON), checked: a title and a list of sections with title, dir, command."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ResultsIndexError(f"{path}: cannot read the results index ({exc.strerror})") from None
    if path.suffix == ".json":
        data = json.loads(text)
    else:
        data = strict_yaml.safe_load(text)
    if not isinstance(data, dict) or not isinstance(data.get("sections"), list):
        raise ResultsIndexError(f"{path}: expected a mapping with a 'sections' list")
    for i, sec in enumerate(data["sections"]):
        if not isinstance(sec, dict):
            raise ResultsIndexError(f"{path}: sections[{i}] must be a mapping")
        for key in ("title", "dir", "command"):
            if not isinstance(sec.get(key), str) or not sec[key].strip():
                raise ResultsIndexError(f"{path}: sections[{i}].{key} must be a non-empty string")
    return data


def _ci(ci: Any, scale: float = 1.0, fmt: str = "+.4f") -> str:
    return f"[{ci[0] * scale:{fmt}}, {ci[1] * scale:{fmt}}]"


def finding(entry: dict[str, Any], n_items: int, reference: str | None = None) -> str | None:
    """One sentence on a configuration against the baseline, from its statistics (None for the baseline).

    With ``reference`` (a run's ``default`` configuration), the NLL difference against it is appended.
    """
    vs = entry.get("vs_baseline")
    if not vs:
        return None
    name = f"`{entry['name']}`" + (" (ORACLE)" if entry.get("oracle") else "")
    scope = f"on {vs['n']} paired items" + ("" if vs["n"] >= n_items else f" of {n_items} (incomplete)")
    parts = []
    if vs.get("nll_diff") is not None:
        lo, hi = vs["nll_diff_ci"]
        verdict = ("lower NLL than the baseline (interval below 0)" if hi < 0 else
                   "higher NLL than the baseline (interval above 0)" if lo > 0 else
                   "no significant NLL difference (interval contains 0)")
        parts.append(f"NLL {vs['nll_diff']:+.4f} nats/token {_ci(vs['nll_diff_ci'])}: {verdict}")
    if vs.get("accuracy_diff") is not None:
        p = vs.get("mcnemar_p")
        sig = p is not None and p < 0.05
        verdict = "significant at 5% (McNemar)" if sig else "no significant accuracy difference (McNemar)"
        parts.append(f"accuracy {vs['accuracy_diff'] * 100:+.1f} pp {_ci(vs['accuracy_diff_ci'], 100, '+.1f')}, "
                     f"McNemar p = {p:.3g}: {verdict}")
    ref = entry.get("vs_reference")
    if ref and ref.get("nll_diff") is not None and reference:
        lo, hi = ref["nll_diff_ci"]
        verdict = "lower" if hi < 0 else "higher" if lo > 0 else "no significant difference"
        parts.append(f"vs `{reference}` {ref['nll_diff']:+.4f} {_ci(ref['nll_diff_ci'])} ({verdict})")
    if not parts:
        return None
    return f"{name} {scope}: " + "; ".join(parts) + "."


def standing(entry: dict[str, Any], n_items: int) -> str | None:
    """One sentence on a configuration's own figures, for a run that compares nothing (yet).

    None when the configuration has no rows.
    """
    rows = entry.get("rows") or 0
    if not rows:
        return None
    name = f"`{entry['name']}`" + (" (ORACLE)" if entry.get("oracle") else "")
    parts = []
    if entry.get("accuracy") is not None:
        lo, hi = entry["accuracy_ci"]
        parts.append(f"{entry['correct']}/{entry['n_scored']} correct ({entry['accuracy'] * 100:.1f}%, "
                     f"Wilson 95% [{lo * 100:.1f}, {hi * 100:.1f}])")
    if entry.get("nll_mean") is not None:
        parts.append(f"mean gold-solution NLL {entry['nll_mean']:.4f} nats/token on {entry['n_nll']} items")
    if not parts:
        return None
    scope = f"{rows} of {n_items} items" + ("" if rows >= n_items else " (incomplete)")
    return f"{name} alone ({scope}; no paired comparison in this run): " + "; ".join(parts) + "."


def _effect(lo: float, hi: float, better_below: bool) -> str:
    if hi < 0:
        return "helps" if better_below else "hurts"
    if lo > 0:
        return "hurts" if better_below else "helps"
    return "no measurable effect"


def _parts(evidence: list[tuple[str, dict[str, Any], int]]) -> list[str]:
    parts = []
    for _title, vs, n_items in evidence:
        scope = f"n = {vs['n']}" + ("" if vs["n"] >= n_items else f" of {n_items}, incomplete")
        if vs.get("accuracy_diff") is not None:
            p = vs.get("mcnemar_p")
            lo, hi = vs["accuracy_diff_ci"]
            effect = _effect(lo, hi, better_below=False) if p is not None and p < 0.05 else "no measurable effect"
            parts.append(f"accuracy: {effect} ({vs['accuracy_diff'] * 100:+.1f} pp "
                         f"{_ci(vs['accuracy_diff_ci'], 100, '+.1f')}, McNemar p = {p:.3g}, {scope})")
        elif vs.get("nll_diff") is not None:
            lo, hi = vs["nll_diff_ci"]
            parts.append(f"gold-solution NLL: {_effect(lo, hi, better_below=True)} ({vs['nll_diff']:+.4f} "
                         f"nats/token {_ci(vs['nll_diff_ci'])}, {scope})")
    return parts


def against_voting(comparison: dict[str, Any], n_items: int) -> str:
    """One clause on a refinement-against-voting comparison (`summarize_run`'s ``versus``): whether refinement
    beats voting, and whether at equal compute (its forward passes per item against voting's; its seconds per item
    against voting's are said beside them)."""
    p, diff, ratio = comparison["mcnemar_p"], comparison["accuracy_diff"], comparison["forward_ratio"]
    n = comparison["n"]
    stats = (f"{comparison['refine_accuracy'] * 100:.1f}% vs {comparison['vote_accuracy'] * 100:.1f}%, "
             f"{diff * 100:+.1f} pp {_ci(comparison['accuracy_diff_ci'], 100, '+.1f')}, McNemar p = {p:.3g}, n = {n}"
             + ("" if n >= n_items else f" of {n_items}"))
    seconds = comparison.get("seconds_ratio")
    # Forward passes decide "equal compute" (a count that no machine changes); seconds are said beside them
    # because a surrogate step counts as one forward pass but runs a forward and a backward over the whole prompt.
    spent = ("" if ratio is None else f" at {ratio:.2f}x voting's forward passes"
             + ("" if seconds is None else f" and {seconds:.2f}x its seconds"))
    if p < 0.05 and diff > 0:
        outcome = ("refinement beats voting at equal or lower compute" if ratio is not None and ratio <= 1 else
                   "refinement beats voting, but spends more compute: not shown at equal compute")
    elif p < 0.05:
        outcome = "voting beats refinement" + (", which spends more" if ratio is not None and ratio > 1 else "")
    elif ratio is not None and ratio > 1:
        outcome = "refinement does not beat voting, although it spends more compute"
    else:
        outcome = "no measurable difference between refinement and voting"
    how = "" if n >= n_items else " (so far; incomplete: decides nothing yet)"
    return (f"refinement (`{comparison['refine']}`) against voting (`{comparison['vote']}`){how}: {outcome} "
            f"({stats}{spent})")


def verdict(model: str, evidence: list[tuple[str, dict[str, Any], int]],
            tuned: list[tuple[str, dict[str, Any], int]] | None = None,
            versus: list[tuple[dict[str, Any], int]] | None = None) -> str:
    """One sentence per model from its ``vps``-vs-baseline statistics: ``evidence`` is (section title,
    the ``vps`` entry's ``vs_baseline``, the run's item count) per run marked for this model; ``tuned``
    the same for a ``tuned`` configuration (a `vps tune` study's best, confirmed in those runs); ``versus``
    (comparison, the run's item count) the refinement-against-voting comparisons of runs marked ``versus``."""
    parts = _parts(evidence)
    tuned_parts = _parts(tuned or [])
    voting = [against_voting(c, n) for c, n in versus or []]
    if not parts and not tuned_parts and not voting:
        return f"**{model}**: no finished comparison yet."
    text = f"**{model}**: " + ("; ".join(parts) if parts else "seed defaults: no finished comparison yet")
    if tuned_parts:
        # "confirmed" only once every test item is in: a partial interval decides nothing yet.
        done = all(vs["n"] >= n_items for _title, vs, n_items in tuned or [])
        how = "measured on test" if done else "measured on test so far (incomplete: decides nothing yet)"
        nll = [vs["nll_diff_ci"] for _title, vs, _n in tuned or [] if vs.get("nll_diff") is not None]
        if done and nll:
            # The confirmation rule the tuning section states before the rows exist: a configuration tuned to
            # lower the NLL is confirmed only where every test interval of its NLL difference lies below 0.
            how += (": confirmed (its NLL interval lies below 0)" if all(hi < 0 for _lo, hi in nll) else
                    ": not confirmed (confirmation needs its NLL interval wholly below 0)")
        text += f"; the configuration tuned on train (`tuned`), {how}: " + "; ".join(tuned_parts)
    if voting:
        text += "; " + "; ".join(voting)
    return text + "."


def _status(summary: dict[str, Any]) -> tuple[bool, str]:
    n = summary["n_items"]
    missing = [e for e in summary["configs"] if e["rows"] < n]
    if not missing:
        return True, f"complete: {len(summary['configs'])} configuration(s) x {n} items"
    done = len(summary["configs"]) - len(missing)
    left = ", ".join(f"`{e['name']}` {e['rows']}/{n}" for e in missing)
    return False, (f"partial: {done} of {len(summary['configs'])} configuration(s) complete; "
                   f"unfinished (rerun the command to resume): {left}")


def _embed(report_md: str, run_dir: str) -> str:
    lines = report_md.splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    out = []
    for ln in lines:
        if ln.startswith("#"):
            ln = "#" + ln  # one level below the section heading
        # The run's report names its files relative to the run directory.
        out.append(ln.replace(f"`{REPORT_PNG}`", f"`{run_dir}/{REPORT_PNG}`")
                   .replace(f"`{RESULTS_FILE}`", f"`{run_dir}/{RESULTS_FILE}`"))
    return "\n".join(out).strip()


def _tune_section(sec: dict[str, Any], path: Path, run_dir: str) -> tuple[str, list[str]]:
    """A `vps tune` study: its outputs rewritten from its study.db, one summary line and its report."""
    from ..tuning.report import refresh

    info = refresh(path)
    states = ", ".join(f"{n} {s}" for s, n in sorted(info["states"].items()))
    best = info["best"]
    if best is None:
        line = f"no trial completed yet ({states or 'no trials'})"
    else:
        lo, hi = best["ci"]
        labels = f" ({', '.join(best['labels'])})" if best["labels"] else ""
        line = (f"best of the completed trials: #{best['number']}{labels}, NLL {best['nll_diff']:+.4f} nats/token "
                f"[{lo:+.4f}, {hi:+.4f}] on the {best['n']} tuning items it was chosen on "
                f"({_effect(lo, hi, True)} there; only the test confirmation counts); trials: {states}")
    title = sec["title"] + (" (preliminary)" if sec.get("preliminary") else "")
    body = [f"## {title}", "", "Status: " + states + ".", "", "Command (rerun it to resume or re-report):", "",
            "    " + " ".join(sec["command"].split()), ""]
    if sec.get("note"):
        body += [str(sec["note"]).strip(), ""]
    body += [_embed((path / REPORT_MD).read_text(encoding="utf-8"), run_dir), ""]
    if (path / REPORT_PNG).exists():
        body += [f"![{sec['title']}]({run_dir}/{REPORT_PNG})", ""]
    return f"- **{title}**: {line}.", body


# What the verdicts above cost: BENCHMARKS.md opens with the ratios and the commands that measured them. The link is
# relative, for a RESULTS.md written beside BENCHMARKS.md at the repository root (as the README's command does).
COST_LINE = ("What it costs: prefill, decode and peak-memory ratios to the unpatched model on CPU and GPU, each with "
             "its command, are in [BENCHMARKS.md, Cost at a glance](BENCHMARKS.md#cost-at-a-glance).")


def build_results(index: dict[str, Any], root: str | Path = ".") -> str:
    """The RESULTS.md text for ``index``; run directories are relative to ``root``."""
    root = Path(root)
    parts = [f"# {index.get('title', 'Results')}", ""]
    if index.get("intro"):
        parts += [str(index["intro"]).strip(), ""]
    body, summary_lines = [], []
    evidence: dict[str, list[tuple[str, dict[str, Any], int]]] = {}
    tuned: dict[str, list[tuple[str, dict[str, Any], int]]] = {}
    versus: dict[str, list[tuple[dict[str, Any], int]]] = {}
    for sec in index["sections"]:
        run_dir = sec["dir"].rstrip("/")
        if (root / run_dir / "tune.json").exists():
            line, section = _tune_section(sec, root / run_dir, run_dir)
            summary_lines.append(line)
            body += section
            continue
        if not (root / run_dir / RUN_FILE).exists():
            title = sec["title"] + " (not started)"
            summary_lines.append(f"- **{title}**: no rows yet.")
            body += [f"## {title}", "", "Status: not started (run the command).", "", "Command:", "",
                     "    " + " ".join(sec["command"].split()), ""]
            continue
        summary = write_report(root / run_dir)
        if sec.get("verdict"):
            for name, into in (("vps", evidence), ("tuned", tuned)):
                entry = next((e for e in summary["configs"] if e["name"] == name and e.get("vs_baseline")), None)
                found = into.setdefault(str(sec["verdict"]), [])
                if entry is not None:
                    found.append((sec["title"], entry["vs_baseline"], summary["n_items"]))
        if sec.get("versus"):
            versus.setdefault(str(sec["versus"]), []).extend(
                (comparison, summary["n_items"]) for comparison in summary.get("versus", []))
        complete, status = _status(summary)
        title = sec["title"] + (" (preliminary)" if sec.get("preliminary") else "")
        title += "" if complete else " (partial)"
        findings = [f for f in (finding(e, summary["n_items"], summary.get("reference")) for e in summary["configs"])
                    if f]
        own = [] if findings else [f for f in (standing(e, summary["n_items"]) for e in summary["configs"]) if f]
        summary_lines.append(f"- **{title}**" + ("" if findings or own else ": no rows yet."))
        summary_lines += [f"  - {f}" for f in findings or own]
        body += [f"## {title}", "", f"Status: {status}.", "", "Command (rerun it to resume or re-report):", "",
                 "    " + " ".join(sec["command"].split()), ""]
        if sec.get("note"):
            body += [str(sec["note"]).strip(), ""]
        body += [_embed((root / run_dir / REPORT_MD).read_text(encoding="utf-8"), run_dir), ""]
        if (root / run_dir / REPORT_PNG).exists():
            body += [f"![{sec['title']}]({run_dir}/{REPORT_PNG})", ""]
    if evidence:
        for model in versus:  # a model with a voting comparison only still gets its line
            evidence.setdefault(model, [])
        against = (" Where a run compares refinement with voting, the line says whether refinement beats voting "
                   "at equal compute (forward passes per item).") if any(versus.values()) else ""
        parts += ["## Does VPS help? (per model: the seed defaults, and a tuned configuration"
                  " where one was confirmed)", "",
                  "Generated from the runs marked for each model below: an accuracy effect counts when McNemar's "
                  "p < 0.05, an NLL effect when its 95% interval excludes 0." + against, "",
                  *[f"- {verdict(m, ev, tuned.get(m), versus.get(m))}" for m, ev in evidence.items()], "",
                  COST_LINE, ""]
    parts += ["## Summary", "", "Each line is generated from the run's statistics (paired with the baseline "
              "on the same items; 95% intervals).", "", *summary_lines, "", *body]
    return "\n".join(parts).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vps.evaluation.digest", description=__doc__.splitlines()[0])
    p.add_argument("index", type=Path, help="results index (YAML or JSON)")
    p.add_argument("-o", "--out", type=Path, default=None, help="write here (default: stdout)")
    p.add_argument("--root", type=Path, default=Path("."), help="directory the run paths are relative to")
    args = p.parse_args(argv)
    try:
        text = build_results(load_index(args.index), args.root)
    except (ResultsIndexError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.write_text(text, encoding="utf-8")
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
