"""`vps.tune`: a resumable Optuna search for the VPS configuration that lowers gold-solution NLL.

Tune on a development split (GSM8K train by default), then confirm once on test with an ordinary
``vps eval --config best.json``: the study never sees test data unless told to, loudly.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .settings import OBJECTIVES, PRUNERS, TuneSettings, is_test_split
from .space import SearchSpace, SpaceError, default_space_path, load_space, parse_space
from .study import TuneResult, run_study

__all__ = ["OBJECTIVES", "PRUNERS", "SearchSpace", "SpaceError", "TestSplitError", "TuneResult", "TuneSettings",
           "default_space_path", "is_test_split", "load_space", "parse_space", "run_study", "tune"]


class TestSplitError(ValueError):
    """Tuning was asked to run on a test split without the explicit override."""

    __test__ = False  # a name pytest would otherwise collect


def check_split(source: str, path: str | Path | None, allow_test: bool) -> bool:
    """Refuse a test split unless ``allow_test``; returns whether the data is a test split."""
    on_test = is_test_split(source, path)
    if on_test and not allow_test:
        raise TestSplitError(f"{source} is a test split: tuning on it would choose the configuration on the data "
                             f"that is meant to confirm it. Tune on gsm8k:train (the default); to do it anyway, "
                             f"pass the explicit override (--allow-test-split), and every output will say "
                             f"TUNED ON TEST DATA")
    return on_test


def tune(model: Any, tokenizer: Any, out: str | Path, n_trials: int = 40, data: str = "gsm8k:train",
         sample: int | None = 200, seed: int = 0, space: str | Path | SearchSpace | None = None,
         prompt: str = "tutor", shots: int = 5, system: str | None = None, batch_size: int = 8,
         objectives: Sequence[str] = ("nll",), pruner: str = "median", prune_startup: int = 5,
         prune_warmup: int = 1, allow_test: bool = False, model_name: str | None = None,
         dtype: str = "float32", progress: bool = True) -> TuneResult:
    """Search ``space`` (a file, a parsed `SearchSpace`, or None for the bundled default) for the
    configuration that most lowers the gold-solution NLL of a seeded ``sample`` of ``data``, in the
    run directory ``out``; rerunning the same call resumes the study. Returns the best trial so far.

    ``n_trials`` counts trials with a verdict (completed, pruned, or failed on their own). The data is
    refused when it is a test split, unless ``allow_test`` (then every output is labelled).
    """
    from ..evaluation.data import load_items
    from ..evaluation.harness import data_info

    parsed = space if isinstance(space, SearchSpace) else load_space(space)
    loaded = load_items(data, sample=sample, seed=seed)
    on_test = check_split(data, loaded.path, allow_test)
    if not loaded.items:
        raise ValueError(f"{data}: no items to tune on")
    settings = TuneSettings(
        model=model_name or str(getattr(getattr(model, "config", None), "name_or_path", "") or "model"),
        data=data_info(loaded, data, sample=sample, seed=seed), space=parsed.to_dict(), dtype=dtype, prompt=prompt,
        shots=shots, system=system, batch_size=batch_size, objectives=tuple(objectives), pruner=pruner,
        prune_startup=prune_startup, prune_warmup=prune_warmup, seed=seed, on_test=on_test)
    if on_test:
        print("warning: TUNED ON TEST DATA (explicit override): every output of this study says so", file=sys.stderr)
    return run_study(model, tokenizer, loaded.items, out, settings, parsed, n_trials, progress=progress)
