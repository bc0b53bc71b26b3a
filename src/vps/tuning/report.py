"""What a study leaves in its directory: ``trials.jsonl``, ``best.json`` (a `VPSConfig` file that
``vps eval --config`` reads as is), ``best_trial.json``, ``report.md`` and ``report.png``.

Every file is rewritten whole from the study's storage (atomically), so it never holds a trial twice
and always agrees with the study.
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path
from typing import Any

from .._io import dumps_strict, write_atomic
from ..config import VPSConfig
from .files import (
    BEST_FILE,
    BEST_TRIAL_FILE,
    CONFIRM_GRID,
    REPORT_MD,
    REPORT_PNG,
    SETTINGS_FILE,
    STUDY_FILE,
    STUDY_NAME,
    TRIALS_FILE,
)
from .settings import TuneSettings

__all__ = ["best_trial", "confirm_commands", "confirm_grid_commands", "refresh", "trial_row", "write_outputs",
           "write_trials"]

TEST_LABEL = "TUNED ON TEST DATA"
#: Below this many completed trials, parameter importances rest on too few points to rank parameters
#: reliably (one lucky trial decides them); the report and the plot call them rough.
ROUGH_IMPORTANCE_TRIALS = 10


def _state(trial: Any) -> str:
    name = trial.state.name.lower()
    if name == "fail" and "failure" not in trial.user_attrs:
        return "interrupted"
    return name


def trial_row(trial: Any, settings: TuneSettings) -> dict[str, Any]:
    """One line of ``trials.jsonl``: params, value(s), interval, state, seconds and labels."""
    attrs = trial.user_attrs
    values = trial.values or []
    labels = list(attrs.get("labels", [])) + ([TEST_LABEL] if settings.on_test else [])
    return {
        "number": trial.number, "state": _state(trial), "params": dict(trial.params),
        "nll_diff": values[0] if values else None, "ci": attrs.get("ci"), "n": attrs.get("n"),
        "overhead": attrs.get("overhead"), "seconds": attrs.get("seconds"),
        "wall_seconds": (trial.datetime_complete - trial.datetime_start).total_seconds()
        if trial.datetime_complete and trial.datetime_start else None,
        "pruned_at": attrs.get("pruned_at"), "steps": len(trial.intermediate_values),
        "failure": attrs.get("failure"), "retry_of": attrs.get("retry_of"), "labels": labels,
        "config": attrs.get("config"),
        # Trials scored before fallbacks were counted lack the key, so their rows read as they always did.
        **({"fallbacks": attrs["fallbacks"]} if "fallbacks" in attrs else {}),
    }


def write_trials(directory: Path, study: Any, settings: TuneSettings) -> None:
    rows = [trial_row(t, settings) for t in study.get_trials(deepcopy=False)]
    write_atomic(directory / TRIALS_FILE, "".join(dumps_strict(r) + "\n" for r in rows))


def best_trial(study: Any) -> Any:
    """The completed trial with the lowest NLL difference (the first objective), or None."""
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE and t.values]
    return min(done, key=lambda t: (t.values[0], t.number)) if done else None


def _run_flags(settings: TuneSettings) -> str:
    """The model and prompt flags of the study, so a confirmation scores what was tuned."""
    flags = [f"--model {shlex.quote(settings.model)}", f"--dtype {settings.dtype}", f"--prompt {settings.prompt}"]
    if settings.prompt == "fewshot":
        flags.append(f"--shots {settings.shots}")
    if settings.system is not None:
        flags.append(f"--system {shlex.quote(settings.system)}")
    return " ".join(flags)


def confirm_commands(directory: Path, settings: TuneSettings) -> list[str]:
    """The ordinary ``vps eval --config best.json`` runs that confirm the best configuration on GSM8K
    test: gold-solution NLL on every item, accuracy on the seeded n = 250 sample."""
    common = (f"vps eval {_run_flags(settings)} --data gsm8k:test --methods base,vps "
              f"--config {shlex.quote(str(directory / BEST_FILE))}")
    return [f"{common} --nll-only --out {shlex.quote(f'{directory}-confirm-nll')}",
            f"{common} --sample 250 --seed 0 --max-new-tokens 512 --out {shlex.quote(f'{directory}-confirm-acc')}"]


def confirm_grid_commands(directory: Path, settings: TuneSettings) -> list[str]:
    """The same two confirmations as `confirm_commands`, run by ``vps ablate`` over ``confirm.yaml``:
    base, the seed defaults (``vps``) and the tuned configuration (``tuned``), paired in one run. Aimed
    at an existing ``--methods base,vps`` run with the same settings, they add only the ``tuned`` rows."""
    common = (f"vps ablate --grid {shlex.quote(str(directory / CONFIRM_GRID))} {_run_flags(settings)} "
              f"--data gsm8k:test")
    return [f"{common} --nll-only --out {shlex.quote(f'{directory}-confirm-nll')}",
            f"{common} --sample 250 --seed 0 --max-new-tokens 512 --out {shlex.quote(f'{directory}-confirm-acc')}"]


def _confirm_grid(best_number: int) -> str:
    return (f"# Written by vps tune: the study's best configuration (trial {best_number}, saved as best.json)\n"
            "# beside the unpatched model and the seed defaults, for `vps ablate --grid` on test data.\n"
            "base: {method: base}\n"
            "vps: {}\n"
            "tuned: {config: best.json}\n")


def _importances(study: Any) -> tuple[dict[str, Any], str | None]:
    """Parameter importances for the NLL difference, by Optuna's own default evaluator, and its name
    (under ``"__evaluator__"``, beside the parameters' float importances)."""
    import warnings

    import optuna
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if len(done) < 2:
        return {}, f"parameter importances need at least 2 completed trials ({len(done)} so far)"
    evaluator_cls = getattr(optuna.importance, "PedAnovaImportanceEvaluator", None) \
        or optuna.importance.FanovaImportanceEvaluator
    try:
        with warnings.catch_warnings():
            # PED-ANOVA says it ranks parameters by how they reach *low* values: what a minimised NLL wants.
            warnings.simplefilter("ignore", UserWarning)
            found = optuna.importance.get_param_importances(study, evaluator=evaluator_cls(),
                                                            target=lambda t: t.values[0])
    except (RuntimeError, ValueError, ZeroDivisionError) as exc:
        return {}, f"parameter importances could not be computed: {exc}"
    # Optuna's order of tied (or, by summation order, nearly tied) importances follows Python's string
    # hashing, so it changed with PYTHONHASHSEED and RESULTS.md did not regenerate byte-identical:
    # ordered here by value to 9 places, then by name.
    ordered = sorted(found.items(), key=lambda kv: (-round(float(kv[1]), 9), kv[0]))
    return {"__evaluator__": evaluator_cls.__name__, **dict(ordered)}, None


def _value(v: Any) -> str:
    """A parameter for a table: floats to 4 significant digits (the full value is in trials.jsonl)."""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _fmt(x: float | None, spec: str = "+.4f") -> str:
    return "-" if x is None or not math.isfinite(x) else format(x, spec)


def write_outputs(directory: Path, study: Any, settings: TuneSettings, space: Any) -> Any:
    """best.json, best_trial.json, report.md and report.png; returns the best trial (or None)."""
    best = best_trial(study)
    rows = [trial_row(t, settings) for t in study.get_trials(deepcopy=False)]
    importances, why_none = _importances(study)
    evaluator = str(importances.pop("__evaluator__", ""))
    commands = confirm_commands(directory, settings)
    if best is not None:
        VPSConfig.from_dict(best.user_attrs["config"]).save(directory / BEST_FILE)
        write_atomic(directory / CONFIRM_GRID, _confirm_grid(best.number))
        row = trial_row(best, settings)
        write_atomic(directory / BEST_TRIAL_FILE, dumps_strict({
            **{k: row[k] for k in ("number", "nll_diff", "ci", "n", "overhead", "params", "labels")},
            "tuned_on": settings.data, "model": settings.model, "prompt": settings.prompt,
            "trials_with_verdict": sum(r["state"] in ("complete", "pruned", "fail") for r in rows),
            "confirm": commands, "confirm_grid": confirm_grid_commands(directory, settings)}, indent=2) + "\n")
    text = _markdown(rows, best, settings, space, importances, why_none,
                     (commands, confirm_grid_commands(directory, settings)), evaluator)
    write_atomic(directory / REPORT_MD, text)
    _plot(directory / REPORT_PNG, rows, importances, settings)
    return best


def _completed(rows: list[dict[str, Any]]) -> int:
    return sum(r["state"] == "complete" for r in rows)


def _study_title(settings: TuneSettings) -> str:
    """What the plot is of: the model and the data it was tuned on (and the test-data label)."""
    data = settings.data
    title = (f"vps tune: {settings.model} ({settings.dtype}, prompt {settings.prompt}) on {data.get('source')}, "
             f"{data.get('n_items')} items")
    return title + (f" - {TEST_LABEL}" if settings.on_test else "")


def _markdown(rows: list[dict[str, Any]], best: Any, settings: TuneSettings, space: Any,
              importances: dict[str, float], why_none: str | None, commands: tuple[list[str], list[str]],
              evaluator: str) -> str:
    states: dict[str, int] = {}
    for r in rows:
        states[r["state"]] = states.get(r["state"], 0) + 1
    data = settings.data
    lines = ["# vps tune", ""]
    if settings.on_test:
        lines += [f"**{TEST_LABEL}**: this study was tuned on a test split (explicit override); its best "
                  "configuration has seen the data it would be confirmed on.", ""]
    lines += [f"- model: `{settings.model}` ({settings.dtype}), prompt `{settings.prompt}`",
              f"- tuned on: `{data.get('source')}`, {data.get('n_items')} items (sample {data.get('sample')}, "
              f"seed {data.get('seed')}), batch {settings.batch_size}",
              "- objective: paired mean difference in gold-solution NLL, patched - unpatched (nats/token; lower is "
              "better), 95% paired bootstrap interval" + (", and the prefill cost ratio (Pareto front)"
                                                          if "overhead" in settings.objectives else ""),
              f"- pruner: {settings.pruner if settings.prunes else 'none'}"
              + (f" (once {settings.prune_startup} trials have finished, after {settings.prune_warmup} "
                 f"warm-up batch(es))"
                 if settings.prunes else ""),
              "- trials: " + ", ".join(f"{n} {s}" for s, n in sorted(states.items())), ""]
    damping = [r["number"] for r in rows if "DAMPING" in r["labels"]]
    if damping:
        lines += [f"DAMPING trials (gamma below 0, outside the seed's range): {', '.join(map(str, damping))}", ""]
    if best is None:
        lines += ["No trial has completed yet.", ""]
    else:
        b = trial_row(best, settings)
        lo, hi = b["ci"] or (None, None)
        lines += ["## Best trial", "",
                  f"Trial {b['number']}: NLL difference {_fmt(b['nll_diff'])} [{_fmt(lo)}, {_fmt(hi)}] nats/token "
                  f"over {b['n']} items" + (f"; prefill cost {b['overhead']:.2f}x" if b["overhead"] else "")
                  + (f" ({', '.join(b['labels'])})" if b["labels"] else "") + ".",
                  "" if hi is None or hi < 0 else
                  "Its interval reaches 0 or above: on the tuning data it is not distinguishable from the unpatched "
                  "model (or is worse).", "",
                  *([] if not (fb := b.get("fallbacks")) else [
                      f"Fallbacks to the base output: {fb['items_with_any']} of the {fb['items']} items scored in "
                      f"its last run had at least one ({fb['total']} in all).", ""]),
                  "Parameters: " + ", ".join(f"`{k}={_value(v)}`" for k, v in sorted(b["params"].items())), "",
                  "Saved as `best.json`; confirm on test with:", "", "```", *commands[0], "```", "",
                  f"or, with the seed defaults beside it (`{CONFIRM_GRID}`: base, `vps`, `tuned`, paired in one "
                  "run; pointed at an existing `--methods base,vps` run with the same settings, it adds only the "
                  "`tuned` rows):", "", "```", *commands[1], "```", ""]
    complete = sorted((r for r in rows if r["state"] == "complete" and r["nll_diff"] is not None),
                      key=lambda r: r["nll_diff"])
    if complete:
        keys = sorted({k for r in complete for k in r["params"]})
        head = ["trial", "NLL diff", "95% CI", *(["prefill x"] if "overhead" in settings.objectives else []), *keys]
        lines += ["## Top trials", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in complete[:10]:
            lo, hi = r["ci"] or (None, None)
            cells = [str(r["number"]) + (" " + " ".join(r["labels"]) if r["labels"] else ""), _fmt(r["nll_diff"]),
                     f"[{_fmt(lo)}, {_fmt(hi)}]"]
            if "overhead" in settings.objectives:
                cells.append(_fmt(r["overhead"], ".2f"))
            cells += [_value(r["params"].get(k, "")) for k in keys]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Parameter importances", ""]
    if importances:
        done = _completed(rows)
        if done < ROUGH_IMPORTANCE_TRIALS:
            lines += [f"**Rough**: from only {done} completed trials (fewer than {ROUGH_IMPORTANCE_TRIALS}); a "
                      "single trial can reorder them.", ""]
        lines += [f"Optuna's `{evaluator}` on the NLL difference of the completed trials (a share of 1 in all; "
                  "with few trials these are rough).", "",
                  "| parameter | importance |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in importances.items()]
    else:
        lines.append(why_none or "none")
    lines += ["", "## Search space", "", f"From `{space.source}`:", ""]
    lines += [f"- `{p.name}`: {p.describe()}" for p in space.params]
    lines += [f"- `{k}` fixed: {v}" for k, v in space.fixed.items()]
    return "\n".join(lines) + "\n"


def _plot(path: Path, rows: list[dict[str, Any]], importances: dict[str, float], settings: TuneSettings) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = _figure(rows, importances, settings)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def _figure(rows: list[dict[str, Any]], importances: dict[str, float], settings: TuneSettings) -> Any:
    """The report's figure: the optimisation history (left) and the parameter importances (right)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.4))
    fig.suptitle(_study_title(settings), fontsize=10)
    done = [r for r in rows if r["state"] == "complete" and r["nll_diff"] is not None]
    if done:
        xs = [r["number"] for r in done]
        ys = [r["nll_diff"] for r in done]
        err = [[y - (r["ci"] or [y, y])[0] for y, r in zip(ys, done, strict=True)],
               [(r["ci"] or [y, y])[1] - y for y, r in zip(ys, done, strict=True)]]
        ax.errorbar(xs, ys, yerr=err, fmt="o", ms=4, alpha=0.6, label="trial (95% CI)")
        best, running = math.inf, []
        for y in ys:
            best = min(best, y)
            running.append(best)
        ax.step(xs, running, where="post", color="C3", label="best so far")
    pruned = [r["number"] for r in rows if r["state"] == "pruned"]
    if pruned:
        ax.plot(pruned, [0.0] * len(pruned), "x", color="grey", label="pruned")
    ax.axhline(0.0, color="black", lw=0.8)
    # Trials are numbered 0, 1, 2, ...: a tick at 0.5 names no trial.
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel("NLL patched - unpatched (nats/token)")
    ax.set_title("optimisation history" + (" - TUNED ON TEST" if settings.on_test else ""))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=8)
    n_done = _completed(rows)
    if importances:
        names = list(importances)[::-1]
        bx.barh(names, [importances[n] for n in names])
        bx.set_xlabel("importance (Optuna)")
    else:
        bx.text(0.5, 0.5, "importances need >= 2 completed trials", ha="center", va="center")
        bx.set_axis_off()
    rough = bool(importances) and n_done < ROUGH_IMPORTANCE_TRIALS
    bx.set_title("parameter importances" + (f" (ROUGH: {n_done} trials < {ROUGH_IMPORTANCE_TRIALS})" if rough else ""),
                 color="C3" if rough else "black")
    fig.tight_layout()
    return fig


def refresh(directory: str | Path) -> dict[str, Any]:
    """Rewrite a study directory's outputs from its ``study.db`` (also while the study still runs) and
    return a summary: trials by state, the best trial's number, value, interval and labels."""
    import json

    import optuna

    from .space import SearchSpace

    directory = Path(directory)
    stored = json.loads((directory / SETTINGS_FILE).read_text(encoding="utf-8"))
    settings = TuneSettings(**{k: v for k, v in stored.items() if k not in ("format", "vps_version")})
    space = SearchSpace.from_dict(settings.space, source=f"{directory / SETTINGS_FILE} (space)")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{(directory / STUDY_FILE).resolve()}")
    write_trials(directory, study, settings)
    best = write_outputs(directory, study, settings, space)
    rows = [trial_row(t, settings) for t in study.get_trials(deepcopy=False)]
    states: dict[str, int] = {}
    for r in rows:
        states[r["state"]] = states.get(r["state"], 0) + 1
    out: dict[str, Any] = {"states": states, "on_test": settings.on_test, "best": None}
    if best is not None:
        b = trial_row(best, settings)
        out["best"] = {k: b[k] for k in ("number", "nll_diff", "ci", "n", "labels", "params")}
    return out
