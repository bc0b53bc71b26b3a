"""Re-read the answers of a finished run from its stored outputs, in another extraction mode.

Accuracy depends on how an answer is read from the text as well as on the text. A run's rows keep
every output, so the reading can change without generating again: `rescore_run` writes a new
evaluation directory whose rows carry the new extraction and correctness, then its report. Nothing
is generated again: a refine row keeps the candidate its loop chose; only that candidate's answer is
read again. A vote row (``maj@K``, ``vps-maj@K``) whose samples are stored is voted again, its samples
read in the new mode, as the run would have voted in it. Rows without an output (NLL-only) are copied
as they are.

The rescored rows leave out the prompt, the output and the refine trace (they stay in the source
run), and ``run.json`` records where the rows came from, so the report says so. Before rescoring,
every row is read again in the run's own mode and must give its stored result: a run written by an
extraction that has since changed is refused rather than compared across two rule sets.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .._io import RunLockedError, RunMismatchError, check_directory, dumps_strict, write_atomic
from ..verify import EXTRACT_MODES, CompositeVerifier, answers_match, extract_answer, parse_gold
from ..verify.consistency import majority_answer
from .report import write_report
from .rundir import RESULTS_FILE, RUN_FILE, RunDir
from .summary import load_run

__all__ = ["RESCORED_FROM", "rescore_rows", "rescore_run"]

RESCORED_FROM = "rescored_from"
_LEFT_IN_SOURCE = ("prompt", "output", "refine")


def _gold(row: dict[str, Any]) -> Any:
    text = row.get("gold_text")
    return parse_gold(str(text)) if text is not None else None


def _vote_texts(row: dict[str, Any]) -> list[str] | None:
    vote = row.get("vote")
    record = vote.get("sample_record") if isinstance(vote, dict) else None
    texts = record.get("texts") if isinstance(record, dict) else None
    return texts if isinstance(texts, list) and texts else None


def _read(row: dict[str, Any], mode: str) -> tuple[Any, bool, dict[str, Any] | None]:
    """A row's answer read in ``mode``, whether it is correct, and for a vote row its votes in that mode."""
    texts = _vote_texts(row)
    if texts is None:
        answer = extract_answer(row["output"], mode)
        return answer, bool(answers_match(answer, _gold(row))), None
    # The vote itself depends on how its samples are read: vote again, as `vote_batch` does.
    votes = [extract_answer(t, mode) for t in texts]
    # The winner is one of ``votes``: the reading, in this mode, of the first sample that carries it.
    answer, count = majority_answer(votes, CompositeVerifier().rel_tol)
    return answer, bool(answers_match(answer, _gold(row))), {
        "answers": [None if a is None else a.text for a in votes], "winner_votes": count}


def rescore_rows(rows: Sequence[dict[str, Any]], mode: str, original_mode: str
                 ) -> tuple[list[dict[str, Any]], dict[str, dict[str, int]]]:
    """The rows with answers read in ``mode``, and per configuration: rows, answers changed, correct
    before and after.

    Raises RunMismatchError when a row read in ``original_mode`` does not give its stored answer and
    correctness (the extraction rules changed since the run).
    """
    if mode not in EXTRACT_MODES:
        raise ValueError(f"extract mode must be one of {EXTRACT_MODES}, got {mode!r}")
    out: list[dict[str, Any]] = []
    counts: dict[str, dict[str, int]] = {}
    for row in rows:
        new = {k: v for k, v in row.items() if k not in _LEFT_IN_SOURCE}
        out.append(new)
        if row.get("output") is None or row.get("correct") is None:
            continue
        again, again_correct, _ = _read(row, original_mode)
        if again_correct != bool(row["correct"]) or (again.text if again else None) != row.get("pred"):
            raise RunMismatchError(
                f"item {row.get('id')!r} ({row.get('config')}): reading its output in the run's own "
                f"{original_mode!r} mode gives {again.text if again else None!r} (correct={again_correct}), "
                f"but the row says {row.get('pred')!r} (correct={row['correct']}); the extraction rules "
                f"changed since this run, so its rows cannot be rescored against them")
        answer, correct, votes = _read(row, mode)
        new.update(pred=answer.text if answer else None, pred_number=answer.number if answer else None,
                   pred_source=answer.source if answer else None, correct=correct)
        if votes is not None:  # the samples stay in the source run, as the outputs do
            new["vote"] = {k: v for k, v in row["vote"].items() if k != "sample_record"} | votes
        c = counts.setdefault(str(row["config"]), {"rows": 0, "changed": 0, "correct_before": 0,
                                                   "correct_after": 0})
        c["rows"] += 1
        c["changed"] += int(new["pred"] != row.get("pred"))
        c["correct_before"] += int(bool(row["correct"]))
        c["correct_after"] += int(correct)
    return out, counts


@contextlib.contextmanager
def _naming_out() -> Iterator[None]:
    """An error about the target directory, re-raised (same type) naming ``--out``."""
    try:
        yield
    except (RunLockedError, ValueError) as exc:
        raise type(exc)(f"--out {exc}") from None


def rescore_run(source: str | Path, out: str | Path, mode: str) -> dict[str, Any]:
    """Write ``out`` (run.json, results.jsonl, report) with ``source``'s answers read in ``mode``.

    Returns the report's summary. ``out`` is rewritten whole on every call (its rows are derived);
    it must not be ``source`` nor any directory that holds a run of its own (nor a directory holding a
    report but no run.json). ``out`` is locked while it is written (`RunLockedError` if another process
    holds it). Its files are strict JSON (a non-finite number is null).
    """
    source, out = Path(source), Path(out)
    with _naming_out():
        check_directory(out)
    if source.resolve() == out.resolve():
        raise ValueError(f"--out must differ from the run directory {source}: rescoring never changes a run")
    if source.exists() and not source.is_dir():
        raise ValueError(f"{source} is a file, not an evaluation directory")
    settings, rows = load_run(source)
    if not settings.get("generate"):
        raise ValueError(f"{source} is an NLL-only run: it holds no generated outputs to read answers from")
    if settings.get(RESCORED_FROM):
        raise ValueError(f"{source} is itself a rescored run; rescore the run it came from, "
                         f"{settings[RESCORED_FROM].get('dir')}")
    original_mode = settings.get("extract_mode", "flexible")
    new_rows, counts = rescore_rows(rows, mode, original_mode)
    new_settings = dict(settings, extract_mode=mode)
    new_settings[RESCORED_FROM] = {"dir": str(source), "extract_mode": original_mode, "configs": counts}
    target = RunDir(out)
    with _naming_out():
        target.check_target()  # not a file, and no report of something that is not a run

    def check_existing() -> None:
        existing = target.read_settings()
        if existing is not None and not existing.get(RESCORED_FROM):
            raise RunMismatchError(f"{out} holds a run of its own; pick another --out")

    check_existing()  # before the lock creates anything
    with contextlib.ExitStack() as held:
        with _naming_out():
            held.enter_context(target.lock())
        check_existing()
        write_atomic(out / RESULTS_FILE, "".join(dumps_strict(r, ensure_ascii=False) + "\n" for r in new_rows))
        write_atomic(out / RUN_FILE, dumps_strict(new_settings, indent=2) + "\n")
        return write_report(out)
