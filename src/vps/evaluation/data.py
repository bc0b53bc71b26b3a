"""Loading evaluation items from GSM8K-style JSONL files.

Only local files are supported: this environment cannot reach dataset hubs, so
named sources such as ``gsm8k:test`` resolve to a checked-in copy under
``shared/data/gsm8k`` (or ``$VPS_DATA_DIR/gsm8k``).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

# The one gold rule, shared with the harness and the verifier.
from ..verify.extract import parse_gold
from ..verify.quantity import Answer

__all__ = ["GSM8K_SPLITS", "Item", "LoadResult", "gold_value", "gsm8k_path", "load_items", "read_gold"]

GSM8K_SPLITS = ("test", "train")
DATA_DIR_ENV = "VPS_DATA_DIR"

_NAMED_SOURCE = re.compile(r"gsm8k(?::(?P<split>\w+))?", re.IGNORECASE)


@dataclass(frozen=True)
class Item:
    """One evaluation question.

    Attributes:
        id: ``id_field`` value when requested, else ``"<file stem>-<line>"``
            with the 1-based line number, stable across runs and subsets.
        question: The prompt text.
        answer: The reference solution text (a bare JSON number is kept as its
            text, ``4`` -> ``"4"``).
        gold: The gold answer read by :func:`vps.verify.parse_gold`, exactly as
            the harness stores it in a row's ``gold``: its number (``1234.0``
            for ``"#### 1,234"``), its text for a non-numeric gold (``"six"``,
            ``"2*x + 1"``), or ``None`` when the answer gives none.
        index: 0-based line position in the source file (line number - 1), so
            it is unaffected by sampling, offset, limit or skipped lines.
    """

    id: str
    question: str
    answer: str
    gold: float | str | None
    index: int


@dataclass(frozen=True)
class LoadResult:
    """Items loaded from ``path`` plus every line that was skipped.

    ``skipped`` holds ``(line_number, reason)`` with 1-based line numbers; each
    entry was also emitted as a warning.
    """

    items: list[Item]
    skipped: list[tuple[int, str]] = field(default_factory=list)
    path: Path | None = None


def read_gold(answer: str) -> Answer | None:
    """The gold `parse_gold` reads from a reference solution, or None where it gives none."""
    try:
        return parse_gold(answer)
    except ValueError:
        return None


def gold_value(gold: Answer | None) -> float | str | None:
    """A gold's value in ``Item.gold`` and a row's ``gold``: its number, else its text."""
    if gold is None:
        return None
    return gold.number if gold.number is not None else gold.text


def _gold_value(answer: str) -> float | str | None:
    """The row value of a gold: its number, else its text; None where the answer gives no gold."""
    return gold_value(read_gold(answer))


def _candidate_roots() -> list[Path]:
    roots: list[Path] = []
    for start in (Path.cwd().resolve(), Path(__file__).resolve().parent):
        for ancestor in (start, *start.parents):
            if ancestor not in roots:
                roots.append(ancestor)
    return roots


def gsm8k_path(split: str = "test") -> Path:
    """Locate the local GSM8K JSONL file for ``split`` ("test" or "train").

    ``$VPS_DATA_DIR/gsm8k/<split>.jsonl`` is used when the variable is set
    (and must then exist); otherwise the first ``shared/data/gsm8k/<split>.jsonl``
    found walking upward from the working directory, then from this package.

    Raises:
        ValueError: If ``split`` is not a known GSM8K split.
        FileNotFoundError: If no copy is found; the message lists where it looked.
    """
    if split not in GSM8K_SPLITS:
        raise ValueError(f"split must be one of {GSM8K_SPLITS}, got {split!r}")
    override = os.environ.get(DATA_DIR_ENV)
    if override:
        path = Path(override).expanduser() / "gsm8k" / f"{split}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{DATA_DIR_ENV}={override!r} is set but {path} does not exist")
        return path
    roots = _candidate_roots()
    for root in roots:
        path = root / "shared" / "data" / "gsm8k" / f"{split}.jsonl"
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"GSM8K {split!r} split not found: looked for shared/data/gsm8k/{split}.jsonl above "
        f"{Path.cwd()} and {Path(__file__).resolve().parent}; set {DATA_DIR_ENV} to a directory "
        f"containing gsm8k/{split}.jsonl"
    )


def _resolve_source(source: str | Path) -> Path:
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if isinstance(source, str):
        named = _NAMED_SOURCE.fullmatch(source.strip())
        if named is not None:
            return gsm8k_path((named.group("split") or "test").lower())
    raise FileNotFoundError(
        f"source {str(source)!r} is neither an existing JSONL file nor a known name "
        f"(gsm8k, gsm8k:test, gsm8k:train); hub datasets are not reachable here, "
        f"so download the data and pass the local file path"
    )


def _check_optional_count(name: str, value: int | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be None or a non-negative integer, got {value!r}")


def _parse_line(
    raw: str,
    line_no: int,
    stem: str,
    question_field: str,
    answer_field: str,
    id_field: str | None,
) -> Item | str:
    """Return an Item, or a reason string when the line is malformed."""
    try:
        record = json.loads(raw)
    except json.JSONDecodeError as exc:
        return f"invalid JSON ({exc.msg} at column {exc.colno})"
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    for name in (question_field, answer_field):
        if name not in record:
            return f"missing field {name!r}"
    question, answer = record[question_field], record[answer_field]
    if not isinstance(question, str):
        return f"field {question_field!r} must be a string, got {type(question).__name__}"
    # A bare answer may be a JSON number ("answer": 4); it is kept as the text the gold rule reads back.
    if isinstance(answer, (int, float)) and not isinstance(answer, bool) and math.isfinite(answer):
        answer = parse_gold(answer).text
    elif not isinstance(answer, str):
        return f"field {answer_field!r} must be a string or a number, got {type(answer).__name__} {answer!r}"
    if id_field is None:
        item_id = f"{stem}-{line_no}"
    else:
        if id_field not in record:
            return f"missing id field {id_field!r}"
        raw_id = record[id_field]
        # Integers are common ids; bools and floats are almost surely a data error.
        if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
            return f"id field {id_field!r} must be a string or integer, got {type(raw_id).__name__}"
        item_id = str(raw_id)
    return Item(id=item_id, question=question, answer=answer, gold=_gold_value(answer), index=line_no - 1)


def _gold_problem(item: Item) -> str | None:
    """Why the item's gold deserves a warning, or None."""
    if item.gold is None:
        return "answer gives no gold answer (blank, or a marker with nothing after it); gold is None"
    if isinstance(item.gold, str) and parse_gold(item.answer).source == "hash":
        return (f"the gold after '####' is not a number ({item.gold!r}); only an answer with the same text "
                f"or an equal expression matches it")
    return None


def load_items(
    source: str | Path,
    question_field: str = "question",
    answer_field: str = "answer",
    limit: int | None = None,
    offset: int = 0,
    sample: int | None = None,
    seed: int = 0,
    id_field: str | None = None,
) -> LoadResult:
    """Load evaluation items from a JSONL file or a named local dataset.

    Args:
        source: Path to a JSONL file, or ``"gsm8k"``, ``"gsm8k:test"``,
            ``"gsm8k:train"`` (see :func:`gsm8k_path`).
        question_field: JSON key holding the question text.
        answer_field: JSON key holding the reference answer text.
        limit: Keep at most this many items (applied last).
        offset: Drop this many items first; past the end gives no items, as
            with slicing, so shard offsets need not be clamped by callers.
        sample: Draw this many items with ``random.Random(seed)``; the drawn
            items are returned in file order so that a sample is a stable
            subset whose order does not depend on the seed.
        seed: Seed for ``sample``.
        id_field: JSON key holding item ids; default ids are ``"<stem>-<line>"``.

    Order of operations: parse every line -> ``sample`` -> ``offset`` -> ``limit``.

    Blank lines are ignored.  Malformed lines (bad JSON, non-object, missing
    field, a question that is not a string, an answer that is neither a string
    nor a finite number, bad or duplicate id) are skipped, recorded in
    ``LoadResult.skipped`` and reported with ``warnings.warn`` as ``file:line``.
    The gold is read by :func:`vps.verify.parse_gold`, the rule the harness
    scores with. An answer that gives no gold (blank, or ``####`` with nothing
    after it) is kept with ``gold=None`` and warned about, since it can never be
    scored correct; so is a non-numeric gold after ``####`` (``#### six``),
    which GSM8K-style data does not mean and which only an answer with the same
    text (or, for the verifier, an equal expression) matches.

    Raises:
        FileNotFoundError: If ``source`` cannot be resolved to a local file.
        ValueError: If ``limit``, ``offset``, ``sample`` or ``seed`` is invalid,
            or ``sample`` exceeds the number of items loaded.
    """
    _check_optional_count("limit", limit)
    _check_optional_count("sample", sample)
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be a non-negative integer, got {offset!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")

    path = _resolve_source(source)
    items: list[Item] = []
    skipped: list[tuple[int, str]] = []
    first_line_of_id: dict[str, int] = {}
    with path.open(encoding="utf-8-sig") as handle:
        for line_no, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            parsed = _parse_line(raw, line_no, path.stem, question_field, answer_field, id_field)
            if isinstance(parsed, Item) and parsed.id in first_line_of_id:
                parsed = f"duplicate id {parsed.id!r} (first seen on line {first_line_of_id[parsed.id]})"
            if isinstance(parsed, str):
                skipped.append((line_no, parsed))
                warnings.warn(f"{path}:{line_no}: {parsed}; line skipped", stacklevel=2)
                continue
            problem = _gold_problem(parsed)
            if problem is not None:
                warnings.warn(f"{path}:{line_no}: {problem}", stacklevel=2)
            first_line_of_id[parsed.id] = line_no
            items.append(parsed)

    if sample is not None:
        if sample > len(items):
            raise ValueError(f"sample={sample} exceeds the {len(items)} items loaded from {path}")
        chosen = sorted(random.Random(seed).sample(range(len(items)), sample))
        items = [items[i] for i in chosen]
    items = items[offset:]
    if limit is not None:
        items = items[:limit]
    return LoadResult(items=items, skipped=skipped, path=path)
