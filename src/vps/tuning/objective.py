"""What a `vps tune` trial measures: the paired gold-solution NLL difference, patched minus unpatched.

The items and their batches are fixed for the whole study (same sample, same order), so the running
mean after batch ``b`` means the same thing in every trial, which is what a pruner compares. The
unpatched NLLs are computed once per study and stored in the run directory (`BaseNLL`).
Lower is better: a negative difference means the patched model finds the gold solutions likelier.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._io import dumps_strict, write_atomic
from ..config import VPSConfig
from ..evaluation.nll import solution_nll
from ..evaluation.stats import paired_bootstrap_diff
from ..kv_cache import logits_to_keep_kwargs
from ..patching import patched, reset_state
from ..prompting import encode
from ..tracing import count_fallbacks

__all__ = ["BaseNLL", "PartialScores", "Pruned", "ScoringTask", "TrialFailed", "TrialScore", "prefill_ratio",
           "score_trial"]


class Pruned(Exception):
    """The pruner stopped a trial after a batch; ``step`` is that batch's index."""

    def __init__(self, step: int) -> None:
        super().__init__(f"pruned after batch {step}")
        self.step = step


class TrialFailed(Exception):
    """A trial's configuration gave no usable score: a patched NLL that is not finite (where the unpatched
    one is). A verdict on the configuration, recorded as a failed trial that counts toward the study's
    total; any other exception while scoring is an error and is raised."""


@dataclass(frozen=True)
class ScoringTask:
    """The fixed items of a study: ids, prompts and gold solutions, already in batches."""

    batches: tuple[tuple[int, ...], ...]  # indices into the lists below, one tuple per batch
    ids: tuple[str, ...]
    prompts: tuple[str, ...]
    solutions: tuple[str, ...]

    @classmethod
    def build(cls, ids: Sequence[str], prompts: Sequence[str], solutions: Sequence[str], tokenizer: Any,
              batch_size: int) -> ScoringTask:
        """Batches of similar length, longest first (little padding; the order is the study's for good)."""
        lengths = [len(tokenizer(p + s, add_special_tokens=False)["input_ids"]) for p, s in zip(prompts, solutions,
                                                                                               strict=True)]
        order = sorted(range(len(ids)), key=lambda i: -lengths[i])
        batches = tuple(tuple(order[i:i + batch_size]) for i in range(0, len(order), batch_size))
        return cls(batches, tuple(ids), tuple(prompts), tuple(solutions))

    def score(self, model: Any, tokenizer: Any, batch: Sequence[int]) -> list[float | None]:
        """Mean NLL per token of each item of ``batch`` (None where it is not finite or has no tokens)."""
        results = solution_nll(model, tokenizer, [self.prompts[i] for i in batch],
                               [self.solutions[i] for i in batch])
        return [r.nll if r.nll is not None and math.isfinite(r.nll) else None for r in results]


class BaseNLL:
    """The unpatched model's NLL per item, computed once per study and kept in ``base_nll.json``.

    Written after every batch (atomically), so an interrupted study resumes where it stopped.
    """

    FILE = "base_nll.json"

    def __init__(self, directory: Path, fingerprint: dict[str, Any]) -> None:
        self.path = Path(directory) / self.FILE
        self.fingerprint = fingerprint
        self.values: dict[str, float | None] = {}
        if self.path.exists():
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if data.get("fingerprint") == fingerprint:
                self.values = dict(data.get("nll", {}))

    def complete(self, task: ScoringTask) -> bool:
        return all(i in self.values for i in task.ids)

    def compute(self, model: Any, tokenizer: Any, task: ScoringTask,
                progress: Callable[[int], None] | None = None) -> None:
        """Score every item not yet stored, batch by batch, with the model unpatched."""
        for batch in task.batches:
            if all(task.ids[i] in self.values for i in batch):
                continue
            with torch.no_grad():
                scores = task.score(model, tokenizer, batch)
            for i, s in zip(batch, scores, strict=True):
                self.values[task.ids[i]] = s
            write_atomic(self.path, dumps_strict({"fingerprint": self.fingerprint, "nll": self.values}) + "\n")
            if progress is not None:
                progress(len(batch))


class PartialScores:
    """The patched NLLs a trial has scored so far, kept in ``partial_trial.json`` after every batch.

    A study runs for days across interrupted sessions, and each trial takes tens of minutes: a trial
    cut off by a kill is re-run with the same parameters (`recover_interrupted`), and its batches
    are independent (the VPS state is reset before each one) and deterministic, so the re-run takes
    the stored values for the batches already scored instead of scoring them again. The file is keyed
    by the study's fingerprint and the trial's configuration: any other trial starts afresh.
    """

    FILE = "partial_trial.json"

    def __init__(self, directory: Path, fingerprint: dict[str, Any], config: dict[str, Any]) -> None:
        self.path = Path(directory) / self.FILE
        self.key = {"fingerprint": fingerprint, "config": config}
        self.values: dict[str, float | None] = {}
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
            except ValueError:  # written atomically, so only a hand edit gets here: start afresh
                data = {}
            if data.get("key") == self.key:
                self.values = dict(data.get("nll", {}))

    def has(self, ids: Sequence[str]) -> bool:
        """Whether every item of ``ids`` has a stored value."""
        return all(i in self.values for i in ids)

    def add(self, scores: dict[str, float | None]) -> None:
        """Store a batch's values (atomically, so a kill leaves the file whole)."""
        self.values.update(scores)
        write_atomic(self.path, dumps_strict({"key": self.key, "nll": self.values}) + "\n")

    def clear(self) -> None:
        """The trial has a verdict: nothing to resume."""
        self.path.unlink(missing_ok=True)


@dataclass(frozen=True)
class TrialScore:
    """A finished trial: the paired mean difference (patched - base, nats/token), its 95% interval, and
    the per-item patched NLLs (None where not finite)."""

    mean: float
    low: float
    high: float
    n: int
    nll: dict[str, float | None]
    seconds: float
    overhead: float | None = None
    #: per item scored in this process (not restored from a partial trial): plans that fell back to the base
    #: output (`vps.tracing.count_fallbacks`), so a trial that was mostly the base model says so.
    fallbacks: dict[str, int] | None = None

    def fallback_summary(self) -> dict[str, int] | None:
        """``{"items", "items_with_any", "total"}`` over the items counted, or None when none were."""
        if not self.fallbacks:
            return None
        counts = list(self.fallbacks.values())
        return {"items": len(counts), "items_with_any": sum(n > 0 for n in counts), "total": sum(counts)}


def score_trial(model: Any, tokenizer: Any, cfg: VPSConfig, task: ScoringTask, base: dict[str, float | None],
                report: Callable[[float, int], bool] | None = None, progress: Callable[[int], None] | None = None,
                n_boot: int = 2000, seed: int = 0, partial: PartialScores | None = None) -> TrialScore:
    """Score ``cfg`` on every batch of ``task``; after each batch ``report(running_mean, step)`` may
    answer True to prune (raises `Pruned`). A patched NLL that is not finite where the unpatched one is
    fails the trial (`TrialFailed`); ``base`` without a single finite value is refused (ValueError), as
    no configuration could be scored against it.

    With ``partial``, batches it already holds are taken from it (the pruner sees the same running
    means as if they were scored again) and each newly scored batch is added to it.
    """
    if not any(base.get(item) is not None for item in task.ids):
        raise ValueError("no item has a finite unpatched NLL to pair with: no configuration can be scored")
    start = time.perf_counter()
    diffs: list[float] = []
    patched_nll: dict[str, float | None] = {}
    fallbacks: dict[str, int] = {}
    with patched(model, cfg), torch.no_grad():
        for step, batch in enumerate(task.batches):
            ids = [task.ids[i] for i in batch]
            if partial is not None and partial.has(ids):
                scores = [partial.values[i] for i in ids]
            else:
                reset_state(model)
                with count_fallbacks(model, len(batch)) as count:
                    scores = task.score(model, tokenizer, batch)
                fallbacks.update(zip(ids, count.per_sequence, strict=True))
                if partial is not None:
                    partial.add(dict(zip(ids, scores, strict=True)))
            for i, s in zip(batch, scores, strict=True):
                item = task.ids[i]
                patched_nll[item] = s
                base_nll = base.get(item)
                if base_nll is None:
                    continue  # the unpatched model gave no finite NLL here: nothing to pair
                if s is None:
                    raise TrialFailed(f"the patched model's NLL on item {item} is not finite")
                diffs.append(s - base_nll)
            if progress is not None:
                progress(len(batch))
            if report is not None and diffs and report(statistics.fmean(diffs), step):
                raise Pruned(step)
    mean, low, high = paired_bootstrap_diff([0.0] * len(diffs), diffs, n_boot=n_boot, seed=seed)
    return TrialScore(mean, low, high, len(diffs), patched_nll, time.perf_counter() - start, fallbacks=fallbacks)


def prefill_ratio(model: Any, tokenizer: Any, cfg: VPSConfig, prompts: Sequence[str], repeats: int = 3) -> float:
    """Seconds of one prefill of ``prompts`` patched with ``cfg`` over unpatched, the two timed in turn
    (median of ``repeats`` each, after one warm-up of each), in this process."""
    device = next(model.parameters()).device
    inputs = encode(tokenizer, prompts, device)
    extra = logits_to_keep_kwargs(model, 1)

    def once() -> float:
        start = time.perf_counter()
        model(**inputs, use_cache=False, **extra)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    base_times, vps_times = [], []
    with torch.no_grad():
        for r in range(repeats + 1):  # round 0 warms both up
            base_time = once()
            with patched(model, cfg):
                vps_time = once()
            if r:
                base_times.append(base_time)
                vps_times.append(vps_time)
    return statistics.median(vps_times) / statistics.median(base_times)
