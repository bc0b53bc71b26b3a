"""A run's statistics, the content of summary.json: its rows loaded and checked, each configuration summarized.

Every configuration is compared with the baseline on the items both have finished: accuracy with a
Wilson 95% interval, the accuracy difference with a paired bootstrap 95% interval, the exact
McNemar p-value, the flips, the mean gold-solution NLL difference with a paired bootstrap interval,
and the cost as the ratio of seconds per item to the baseline's (all from `compare_paired`).
Oracle configurations (gold answer used at test time) are marked ``oracle``.

Where a run also holds a configuration named ``default`` (an ablation grid's seed defaults), every
other configuration is compared with it too, in the same way (``vs_reference``): an ablation asks
whether a change beats the defaults, not only the unpatched model.

Where a run draws samples (refinement, majority votes), compute is part of the comparison: every
configuration gets its mean model passes per item (``passes``, from each method's `Method.passes`), and
each gold-free refinement configuration is compared with each voting configuration on their paired items
(``versus``): the accuracy difference, refinement minus voting, and what refinement spent relative to voting.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._io import RunMismatchError
from .methods import find_method
from .rundir import RunDir
from .stats import compare_paired, paired_bootstrap_diff, wilson_interval

__all__ = ["load_run", "pair_stats", "summarize_run"]

BOOTSTRAP_SEED = 0
BOOTSTRAP_RESAMPLES = 10000  # compare_paired's default
REFERENCE_CONFIG = "default"


def load_run(out_dir: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """run.json and every complete row of ``out_dir``."""
    run = RunDir(out_dir)
    settings = run.read_settings()
    if settings is None:
        raise FileNotFoundError(f"{run.run_file} not found: {out_dir} is not an evaluation directory")
    rows = run.read_rows()
    # A row the harness did not write for this run would be counted as if it had: refuse it, named.
    configs, n_items = settings.get("configs", {}), settings.get("data", {}).get("n_items")
    counts: dict[str, int] = {}
    for row in rows:
        if row["config"] not in configs:
            raise RunMismatchError(f"{run.results}: a row of id {row['id']!r} names configuration {row['config']!r}, "
                                   f"which {run.run_file} does not hold")
        counts[row["config"]] = counts.get(row["config"], 0) + 1
    over = {name: n for name, n in counts.items() if n_items is not None and n > n_items}
    if over:
        name, n = next(iter(over.items()))
        raise RunMismatchError(f"{run.results}: {n} rows for configuration {name!r}, but the run has {n_items} "
                               f"items (rows for ids not in its data)")
    return settings, rows


def _all_present(rows: Sequence[dict[str, Any]], key: str) -> bool:
    return bool(rows) and all(r.get(key) is not None for r in rows)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def pair_stats(base_rows: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]],
               seed: int = BOOTSTRAP_SEED) -> dict[str, Any] | None:
    """`compare_paired` on the items both row sets hold (paired by id, in item order), or None.

    Accuracy statistics need ``correct`` on every paired row; NLL needs ``nll``; the cost ratio
    needs ``seconds``. An NLL-only pair gets the same keys with the accuracy ones set to None and
    the NLL difference from `paired_bootstrap_diff` (what `compare_paired` uses).
    """
    base_by_id = {r["id"]: r for r in base_rows}
    pairs = sorted(((base_by_id[r["id"]], r) for r in rows if r["id"] in base_by_id),
                   key=lambda p: (p[0].get("index", 0), str(p[0]["id"])))
    if not pairs:
        return None
    b, m = [p[0] for p in pairs], [p[1] for p in pairs]
    nll = (([r["nll"] for r in b], [r["nll"] for r in m])
           if _all_present(b, "nll") and _all_present(m, "nll") else (None, None))
    secs = (([r["seconds"] for r in b], [r["seconds"] for r in m])
            if _all_present(b, "seconds") and _all_present(m, "seconds") and sum(r["seconds"] for r in b) > 0
            else (None, None))
    if _all_present(b, "correct") and _all_present(m, "correct"):
        out = compare_paired([r["correct"] for r in b], [r["correct"] for r in m], nll[0], nll[1],
                             secs[0], secs[1], seed=seed)
    else:
        out = {key: None for key in ("base_accuracy", "base_accuracy_ci", "method_accuracy", "method_accuracy_ci",
                                     "accuracy_diff", "accuracy_diff_ci", "flips_to_correct", "flips_to_wrong",
                                     "mcnemar_p", "nll_diff", "nll_diff_ci", "base_seconds_mean",
                                     "method_seconds_mean", "cost_ratio")}
        out["n"] = len(pairs)
        if nll[0] is not None:
            diff, low, high = paired_bootstrap_diff(nll[0], nll[1], seed=seed)
            out.update(nll_diff=diff, nll_diff_ci=(low, high))
        if secs[0] is not None:
            base_mean, method_mean = _mean(secs[0]), _mean(secs[1])
            assert base_mean is not None and method_mean is not None  # pairs is not empty
            out.update(base_seconds_mean=base_mean, method_seconds_mean=method_mean,
                       cost_ratio=method_mean / base_mean)
    return out


def summarize_run(settings: dict[str, Any], rows: Sequence[dict[str, Any]],
                  seed: int = BOOTSTRAP_SEED) -> dict[str, Any]:
    """Per-configuration numbers and comparisons with the baseline (the content of summary.json)."""
    configs = settings.get("configs", {})
    by_config: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
    for row in rows:
        by_config.setdefault(row["config"], []).append(row)
    n_items = settings.get("data", {}).get("n_items")
    baseline = settings.get("baseline")
    if baseline is None:
        baseline = next((n for n, s in configs.items() if s.get("method") == "base"), None)
    reference = REFERENCE_CONFIG if by_config.get(REFERENCE_CONFIG) and baseline != REFERENCE_CONFIG else None
    entries = []
    for name, crow in by_config.items():
        spec = configs.get(name, {})
        oracle = bool(spec.get("oracle")) or any(r.get("oracle") for r in crow)
        scored = [r for r in crow if r.get("correct") is not None]
        correct = sum(bool(r["correct"]) for r in scored)
        nlls = [r["nll"] for r in crow if r.get("nll") is not None]
        entry: dict[str, Any] = {
            "name": name, "method": spec.get("method") or (crow[0].get("method") if crow else None), "oracle": oracle,
            "rows": len(crow), "complete": n_items is None or len(crow) >= n_items,
            "n_scored": len(scored), "correct": correct if scored else None,
            "accuracy": correct / len(scored) if scored else None,
            "accuracy_ci": list(wilson_interval(correct, len(scored))) if scored else None,
            "nll_mean": _mean(nlls), "n_nll": len(nlls),
            "seconds_mean": _mean([r["seconds"] for r in crow if r.get("seconds") is not None]),
            "tokens_mean": _mean([r["tokens"] for r in crow if r.get("tokens") is not None]),
            "nll_seconds_mean": _mean([r["nll_seconds"] for r in crow if r.get("nll_seconds") is not None]),
            "vs_baseline": None, "vs_reference": None,
        }
        counted = [r["fallbacks"] for r in crow if isinstance(r.get("fallbacks"), int)]
        if counted:  # only rows written since fallbacks were recorded carry them; other summaries stay as they were
            entry["fallbacks"] = {"rows": len(counted), "items_with_any": sum(n > 0 for n in counted),
                                  "total": sum(counted)}
        for key, ref in (("vs_baseline", baseline), ("vs_reference", reference)):
            if ref is not None and name not in (baseline, ref) and by_config.get(ref):
                stats = pair_stats(by_config[ref], crow, seed=seed)
                if stats is not None:
                    entry[key] = {k: list(v) if isinstance(v, tuple) else v for k, v in stats.items()}
        entries.append(entry)
    families = {name: find_method(spec.get("method")) for name, spec in configs.items()}
    versus: list[dict[str, Any]] = []
    # Only runs that draw samples weigh compute, so the summaries of every other run stay as they were.
    if any(f is not None and f.samples for f in families.values()):
        row_passes = {name: _row_passes(by_config[name], families.get(name)) for name in by_config}
        for entry in entries:
            entry["passes"] = _passes(row_passes[entry["name"]])
        versus = _versus(entries, by_config, families, row_passes, seed)
    # Only a run that copied rows carries the key, so the summaries of every other run stay as they were.
    imported = {"imported": settings["imported"]} if settings.get("imported") else {}
    return {
        "model": settings.get("model"), "dtype": settings.get("dtype"), "data": settings.get("data", {}),
        "n_items": n_items, "generate": settings.get("generate"), "nll": settings.get("nll"),
        "max_new_tokens": settings.get("max_new_tokens"), "temperature": settings.get("temperature"),
        "stop_strings": settings.get("stop_strings"), "extract_mode": settings.get("extract_mode"),
        "baseline": baseline, "reference": reference, "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": seed},
        "rescored_from": settings.get("rescored_from"), **imported, "configs": entries,
        **({"versus": versus} if versus else {}),
    }


def _row_passes(rows: Sequence[dict[str, Any]], family: Any) -> dict[str, tuple[int, int]]:
    """Each row's (forward, backward) passes by item id, where its method can say (`Method.passes`)."""
    if family is None:
        return {}
    out = {}
    for row in rows:
        passes = family.passes(row)
        if passes is not None:
            out[row["id"]] = passes
    return out


def _passes(found: dict[str, tuple[int, int]]) -> dict[str, Any] | None:
    """A configuration's mean forward and backward passes per item, from its rows' (`_row_passes`); None when
    no row can say."""
    if not found:
        return None
    return {"rows": len(found), "forward_mean": _mean([f for f, _ in found.values()]),
            "backward_mean": _mean([b for _, b in found.values()])}


def _versus(entries: Sequence[dict[str, Any]], by_config: dict[str, list[dict[str, Any]]],
            families: dict[str, Any], row_passes: dict[str, dict[str, tuple[int, int]]],
            seed: int) -> list[dict[str, Any]]:
    """Each gold-free refinement configuration against each voting one, on the items both finished: accuracy
    (refinement minus voting, `pair_stats` with the vote as the baseline) and the ratios of refinement's forward
    passes and seconds per item to voting's on those items."""
    refiners = [e for e in entries if (f := families.get(e["name"])) is not None and f.refines and not e["oracle"]]
    voters = [e for e in entries if (f := families.get(e["name"])) is not None and f.votes]
    out = []
    for r in refiners:
        for v in voters:
            stats = pair_stats(by_config[v["name"]], by_config[r["name"]], seed=seed)
            if stats is None or stats.get("accuracy_diff") is None:
                continue
            r_passes, v_passes = row_passes[r["name"]], row_passes[v["name"]]
            paired = [i for i in r_passes if i in v_passes]
            r_fwd = sum(r_passes[i][0] for i in paired)
            v_fwd = sum(v_passes[i][0] for i in paired)
            out.append({
                "refine": r["name"], "vote": v["name"], "n": stats["n"],
                "refine_accuracy": stats["method_accuracy"], "vote_accuracy": stats["base_accuracy"],
                "accuracy_diff": stats["accuracy_diff"], "accuracy_diff_ci": list(stats["accuracy_diff_ci"]),
                "mcnemar_p": stats["mcnemar_p"], "refine_only_correct": stats["flips_to_correct"],
                "vote_only_correct": stats["flips_to_wrong"],
                "forward_ratio": r_fwd / v_fwd if paired and v_fwd > 0 else None,
                "backward_per_item": _mean([r_passes[i][1] for i in paired]) if paired else None,
                "seconds_ratio": stats["cost_ratio"],
            })
    return out
