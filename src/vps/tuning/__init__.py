"""`vps.tune`: a resumable Optuna search for the VPS configuration that lowers gold-solution NLL.

Tune on a development split (GSM8K train by default), then confirm once on test with an ordinary
``vps eval --config best.json``: the study never sees test data unless told to, loudly.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._lazy import lazy_exports
from ..prompting import DEFAULT_SHOTS, DEFAULT_STYLE
from .settings import OBJECTIVES, PRUNERS, TuneSettings
from .space import SearchSpace, SpaceError, default_space_path, load_space, parse_space
from .split import SplitCheck, check_test_split, name_says_test

if TYPE_CHECKING:
    from .study import TuneResult

__all__ = ["OBJECTIVES", "PRUNERS", "SearchSpace", "SpaceError", "SplitCheck", "TestSplitError", "TuneResult",
           "TuneSettings", "check_split", "check_test_split", "default_space_path", "load_space", "name_says_test",
           "parse_space", "run_study", "tune"]

# The study loop imports torch and Optuna: it loads on first use, so that the command line (which reads
# `TuneSettings` to declare ``vps tune``'s flags) stays free of both.
__getattr__, __dir__ = lazy_exports(__name__, globals(), {"TuneResult": "study", "run_study": "study"})


class TestSplitError(ValueError):
    """Tuning was asked to run on a test split without the explicit override."""

    __test__ = False  # a name pytest would otherwise collect


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def check_split(source: str, path: str | Path | None, allow_test: bool, questions: Sequence[str],
                log: Callable[[str], None] = _stderr) -> bool:
    """Refuse data that is a test split unless ``allow_test``; returns whether it is one.

    ``questions`` are those the study would tune on; any of them in the local GSM8K test set makes the
    data a test split, as does a name that marks one (`vps.tuning.split`). Where the GSM8K test file
    is absent, ``log`` says that only the name could be checked; with the override, it says the study
    is TUNED ON TEST DATA and why.
    """
    found = check_test_split(source, path, questions)
    if found.unchecked is not None:
        log(f"warning: --data {source}: the content check against the GSM8K test set could not run "
            f"({found.unchecked}); only the name was checked")
    if found.on_test and not allow_test:
        raise TestSplitError(f"--data {source} is a test split: {found.reason()}. Tuning on it would choose the "
                             f"configuration on the data that is meant to confirm it. Tune on gsm8k:train (the "
                             f"default) or data without test questions; to do it anyway, pass the explicit override "
                             f"(--allow-test-split), and every output will say TUNED ON TEST DATA")
    if found.on_test:
        log(f"warning: TUNED ON TEST DATA (explicit override --allow-test-split): --data {source}: {found.reason()}; "
            f"every output of this study says so")
    return found.on_test


def tune(model: Any, tokenizer: Any, out: str | Path, n_trials: int = 40, data: str = "gsm8k:train",
         sample: int | None = 200, seed: int = 0, space: str | Path | SearchSpace | None = None,
         prompt: str = DEFAULT_STYLE, shots: int = DEFAULT_SHOTS, system: str | None = None, batch_size: int = 8,
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
    from ..evaluation.settings import data_info
    from .study import run_study

    parsed = space if isinstance(space, SearchSpace) else load_space(space)
    loaded = load_items(data, sample=sample, seed=seed)
    on_test = check_split(data, loaded.path, allow_test, [it.question for it in loaded.items])
    if not loaded.items:
        raise ValueError(f"{data}: no items to tune on")
    settings = TuneSettings(
        model=model_name or str(getattr(getattr(model, "config", None), "name_or_path", "") or "model"),
        data=data_info(loaded, data, sample=sample, seed=seed), space=parsed.to_dict(), dtype=dtype, prompt=prompt,
        shots=shots, system=system, batch_size=batch_size, objectives=tuple(objectives), pruner=pruner,
        prune_startup=prune_startup, prune_warmup=prune_warmup, seed=seed, on_test=on_test)
    return run_study(model, tokenizer, loaded.items, out, settings, parsed, n_trials, progress=progress)
