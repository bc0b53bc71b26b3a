"""Reusing another run's baseline rows (``vps eval --baseline-from RUN_DIR``).

The unpatched model's rows do not depend on which other methods share a run, so a confirmation or a new
method on items an earlier run already covered need not pay for ``base`` again: its rows are copied from
that run. Only a run whose base rows would come out the same is accepted: every setting that changes a
base row must agree (`BASE_SETTINGS`; the sampling seed only when decoding samples), the data must be the
same file read the same way, and each copied row must be for the same item (same id, same rendered
prompt, same gold). The data selection may differ: the first 50 items of a seeded sample of 250 take
their rows from the run over all 250. Every refusal names the setting, or the item, that differs.

Copied rows keep everything they held (their seconds measured where they ran) and gain ``imported_from``;
``run.json`` records the source and the number of rows under `IMPORTED`, and the report says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._io import RunMismatchError, flatten
from .data import Item
from .rundir import FORMAT1_MODES, RUN_FILE, RunDir, computed_mode

__all__ = ["BASE_SETTINGS", "IMPORTED", "IMPORTED_FROM", "check_source", "imported_rows"]

#: run.json key: ``{config name: {"from": source dir, "rows": n}}`` for rows copied from another run.
IMPORTED = "imported"
#: Row key naming the run a copied row came from.
IMPORTED_FROM = "imported_from"

#: The settings that decide a ``base`` row, compared between the two runs (``data.*``: the same file, read
#: the same way; which of its items each run selected may differ).
BASE_SETTINGS = ("model", "dtype", "generate", "nll", "prompt", "shots", "system", "data.path",
                 "data.question_field", "data.answer_field")
_GENERATION = ("max_new_tokens", "temperature", "stop_strings", "extract_mode")


def _base_name(settings: dict[str, Any]) -> str | None:
    return next((n for n, s in settings.get("configs", {}).items() if s.get("method") == "base"), None)


def check_source(source: str | Path, settings: dict[str, Any]) -> tuple[RunDir, str]:
    """The run directory at ``source`` and the name of its base configuration, when its base rows can stand
    for this run's (``settings``: this run's ``run.json`` contents). ValueError naming the difference."""
    if _base_name(settings) is None:
        raise ValueError("--baseline-from supplies `base` rows, and --methods has no base")
    run = RunDir(source)
    if not run.run_file.is_file():
        raise ValueError(f"--baseline-from {source}: no {RUN_FILE} there (not a run directory written by vps eval "
                         f"or vps ablate)")
    stored = run.read_settings() or {}
    name = _base_name(stored)
    if name is None:
        raise ValueError(f"--baseline-from {source}: that run has no `base` configuration to take rows from")
    keys = list(BASE_SETTINGS)
    if settings.get("generate") or stored.get("generate"):
        keys += _GENERATION
        if settings.get("temperature") or stored.get("temperature"):
            keys.append("seed")  # sampled decoding draws from the seed; greedy decoding ignores it
    mine, theirs = flatten(settings), flatten(stored)
    differ = [f"{k}: there {theirs.get(k)!r}, here {mine.get(k)!r}" for k in keys if theirs.get(k) != mine.get(k)]
    # The source must have scored NLL as every run now does (run.json format 1 recorded how it scored).
    if settings.get("nll") and computed_mode(stored, "nll_scoring") != FORMAT1_MODES["nll_scoring"]:
        differ.append(f"nll_scoring: there {computed_mode(stored, 'nll_scoring')!r}, here "
                      f"{FORMAT1_MODES['nll_scoring']!r}")
    if differ:
        raise ValueError(f"--baseline-from {source}: its base rows were made with other settings, so they cannot "
                         f"stand for this run's: {'; '.join(differ)}")
    return run, name


def imported_rows(run: RunDir, source_name: str, name: str, items: Sequence[Item], prompts: dict[str, str],
                  golds: dict[str, Any], skip: set[str]) -> list[dict[str, Any]]:
    """Copies of ``run``'s ``source_name`` rows for ``items`` (except the ids in ``skip``), relabelled
    ``name`` and marked with their source; an item the source lacks is left to be computed here.

    Raises RunMismatchError when a row's prompt or gold differs from this run's for the same id (the
    same file, changed since, or another prompt rendering)."""
    by_id = {str(r.get("id")): r for r in run.read_rows() if r.get("config") == source_name}
    copied = []
    for item in items:
        row = by_id.get(item.id)
        if row is None or item.id in skip:
            continue
        if row.get("prompt") != prompts[item.id] or row.get("gold_text") != golds[item.id]:
            field = "prompt" if row.get("prompt") != prompts[item.id] else "gold"
            raise RunMismatchError(f"--baseline-from {run.path}: item {item.id!r} has another {field} there than "
                                   f"here; its base row cannot stand for this run's")
        copied.append({**row, "config": name, IMPORTED_FROM: str(run.path)})
    return copied
