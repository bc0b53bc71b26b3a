"""The run directory of an evaluation: ``run.json`` and the append-only ``results.jsonl``.

``run.json`` holds the run's settings, ``results.jsonl`` one row per (item id, config name), appended
as each batch completes (one write, flushed and fsynced). A final line cut off mid-write is dropped
with a warning on the next read. A rerun whose settings differ is refused by `merge_settings` (through
`vps._io.check_resume`) rather than mixing results.

One process at a time works in a run directory: `RunDir.lock` takes the directory's exclusive lock
(`vps._io.lock_directory`: ``<dir>/.lock``, recording the holder's pid and host) for the whole run, and a
second process is refused with `vps._io.RunLockedError` naming the holder.

A data-parallel run (`vps.evaluation.distributed`) works in the same directory with several processes:
rank R appends to its own ``rows.rank{R}.jsonl`` under its own lock ``.lock.rank{R}`` (a second process
of the same rank is refused; different ranks do not block each other), rank 0 also holds ``.lock`` (so
a single-process run or another launch is refused), and rank 0 moves the rank files' rows into
``results.jsonl`` (`RunDir.merge_rank_files`) before the ranks start and after they have all finished.
Outside a running launch, rank files are what an interrupted launch left; the next run merges them.

Every file written here is strict JSON (`vps._io.dumps_strict`): a non-finite float (NaN, inf) is written
as ``null``, never as the ``NaN`` / ``Infinity`` that strict readers reject.

``run.json`` format 1 also recorded how a run computed four things (`FORMAT1_MODES`): today every run computes
them the one way named there, and format 2 records none of them. A format-1 run that computed one of them
another way still reports, but is refused on resume, naming the setting (`retired_modes`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._io import (
    LOCK_FILE,
    RunMismatchError,
    check_directory,
    check_resume,
    dumps_strict,
    flatten,
    lock_directory,
    read_json_object,
    write_atomic,
)
from .._version import __version__

if TYPE_CHECKING:
    from .methods.registry import MethodSpec
    from .settings import RunSettings

__all__ = [
    "FORMAT1_MODES", "REPORT_MD", "REPORT_PNG", "RESULTS_FILE", "RUN_FILE", "RUN_FORMAT", "SUMMARY_JSON", "RunDir",
    "computed_mode", "merge_settings", "rank_lock_name", "rank_rows_name", "retired_modes", "row_problem",
    "rows_payload", "run_record",
]

RESULTS_FILE = "results.jsonl"
RUN_FILE = "run.json"
# What a run directory's report writes (vps.evaluation.report).
REPORT_MD = "report.md"
REPORT_PNG = "report.png"
SUMMARY_JSON = "summary.json"
# The format of run.json: 2 since the four settings of FORMAT1_MODES are no longer recorded.
RUN_FORMAT = 2
# A data-parallel rank's rows file and lock (see the module docstring).
_RANK_ROWS = re.compile(r"rows\.rank(\d+)\.jsonl")
# A directory holding one of the report's files without a run.json is not a run directory, and is not
# overwritten.
_REPORT_FILES = (REPORT_MD, SUMMARY_JSON, REPORT_PNG)
# How every run computes what run.json format 1 recorded as settings (the batch order, the NLL scoring of a
# patched model, whether refine methods take a batch of items at a time, how self-consistency samples are
# drawn). None but refine_sampling changes a number beyond float rounding; refine_sampling changes which
# random draws the samples get. Runs of format 1 recorded the value they used, except those written before
# a setting existed, which lack it (and computed it another way).
FORMAT1_MODES = {"batch_order": "length", "nll_scoring": "cached", "refine_batching": "batch",
                 "refine_sampling": "streams"}
# Compared settings that runs written before they existed lack; the value is what those runs did.
_COMPARED_DEFAULTS = {"prompt": "tutor"}
# "imported": where rows copied from another run came from (vps.evaluation.baseline), a record, not a setting.
_NOT_COMPARED = {"format", "vps_version", "command", "baseline", "configs", "data.source", "data.path",
                 "data.skipped", "imported", *FORMAT1_MODES}
# Settings that only matter when generating.
_GENERATION = {"max_new_tokens", "temperature", "stop_strings", "extract_mode"}


def rank_rows_name(rank: int) -> str:
    """The rows file of a data-parallel run's rank ``rank``: ``rows.rank{rank}.jsonl``."""
    return f"rows.rank{rank}.jsonl"


def rank_lock_name(rank: int) -> str:
    """The lock file of a data-parallel run's rank ``rank``: ``.lock.rank{rank}``."""
    return f"{LOCK_FILE}.rank{rank}"


def _row_key(row: dict[str, Any]) -> tuple[str, str]:
    return str(row.get("id")), str(row.get("config"))


# -- rows ----------------------------------------------------------------------------------------------
# Row fields the report and rescoring compute with, and the types the harness writes them as (None: no value).
_ROW_TEXT = ("id", "config")
_ROW_NUMBERS = ("nll", "seconds", "nll_seconds", "tokens", "nll_tokens", "fallbacks")
_ROW_OPTIONAL_TEXT = ("output", "gold_text", "pred")


def row_problem(row: dict[str, Any]) -> str | None:
    """What is wrong with a stored row, or None: the keys the report and rescoring rely on, with the types the
    harness writes (checked on read, so a hand-edited row is named by its line instead of crashing a report)."""
    for key in _ROW_TEXT:
        if not isinstance(row.get(key), (str, int)) or isinstance(row.get(key), bool) or row.get(key) == "":
            return f"field {key!r} must be non-empty text, got {row.get(key)!r}"
    for key in _ROW_NUMBERS:
        value = row.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            return f"field {key!r} must be a number or null, got {value!r}"
    for key in _ROW_OPTIONAL_TEXT:
        if row.get(key) is not None and not isinstance(row.get(key), str):
            return f"field {key!r} must be text or null, got {row.get(key)!r}"
    if row.get("gold_text") is not None and not row["gold_text"].strip():
        return "field 'gold_text' is blank (null means no gold)"
    if row.get("correct") is not None and not isinstance(row["correct"], bool):
        return f"field 'correct' must be true, false or null, got {row['correct']!r}"
    return None


def rows_payload(rows: Sequence[dict[str, Any]]) -> bytes:
    """What `RunDir.append` writes for ``rows``: one strict-JSON line per row."""
    return "".join(dumps_strict(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


# -- settings ------------------------------------------------------------------------------------------
def _comparable_spec(spec: dict[str, Any]) -> dict[str, Any]:
    cfg = spec.get("config")
    if cfg is not None:
        from ..config import VPSConfig

        # A field added since a run was written takes its default, which is what that run did (a new
        # field always defaults to the old behaviour), so the run still resumes.
        cfg = {k: v for k, v in {**VPSConfig().to_dict(), **cfg}.items() if k != "version"}
    return {"method": spec.get("method"), "config": cfg, "votes": spec.get("votes")}


def run_record(settings: RunSettings, specs: Sequence[MethodSpec]) -> dict[str, Any]:
    """run.json's content for a run of ``specs`` with ``settings``: the format and version it was written with,
    the settings (`RunSettings.to_dict`), the baseline (the ``base`` configuration) and every configuration."""
    base = next((s.name for s in specs if s.method == "base"), None)
    return {"format": RUN_FORMAT, "vps_version": __version__, **settings.to_dict(), "baseline": base,
            "configs": {s.name: s.to_dict() for s in specs}}


def computed_mode(stored: dict[str, Any], key: str) -> Any:
    """How the run whose run.json holds ``stored`` computed ``key`` (a key of `FORMAT1_MODES`): the value a
    format-1 run.json records (None where it records none), and `FORMAT1_MODES`'s for every later format."""
    return stored.get(key) if stored.get("format", 1) == 1 else FORMAT1_MODES[key]


def retired_modes(stored: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What a run with ``stored`` settings computed another way than a run with ``new`` settings would, among
    the `FORMAT1_MODES` that matter for what ``new`` computes: the batch order always, the NLL scoring when it
    scores NLL, refine batching when it runs a refine method, refine sampling when a method samples. Each as
    "key 'value' (now always 'value')"."""
    from .methods import find_method

    names = {spec.get("method") for spec in new.get("configs", {}).values() if isinstance(spec, dict)}
    methods = [m for m in map(find_method, names) if m is not None]
    applies = {"batch_order": True, "nll_scoring": bool(new.get("nll")),
               "refine_batching": any(m.refines for m in methods),
               "refine_sampling": any(m.samples for m in methods)}
    found = []
    for key, now in FORMAT1_MODES.items():
        was = computed_mode(stored, key)
        if applies[key] and was != now:
            what = f"{key} {was!r}" if was is not None else f"no {key} (written before the setting existed)"
            found.append(f"{what}, now always {now!r}")
    return found


def merge_settings(stored: dict[str, Any], new: dict[str, Any], where: str) -> dict[str, Any]:
    """``stored`` extended with ``new``'s configurations; raises `RunMismatchError` on any difference
    (`vps._io.check_resume`), and on a format-1 run that computed a retired way (`retired_modes`)."""
    retired = retired_modes(stored, new)
    if retired:
        raise RunMismatchError(
            f"{where}/{RUN_FILE} (format 1) records {'; '.join(retired)}: this run was computed in a way vps no "
            f"longer has, so it cannot be resumed (its results still report); use another --out directory")
    skip = set(_NOT_COMPARED)
    if not new.get("generate") and not stored.get("generate"):
        skip |= _GENERATION
    problems = []
    for name, spec in new.get("configs", {}).items():
        old = stored.get("configs", {}).get(name)
        if old is not None and _comparable_spec(old) != _comparable_spec(spec):
            changed = flatten(_comparable_spec(spec))
            before = flatten(_comparable_spec(old))
            fields = sorted(k for k in changed.keys() | before.keys() if changed.get(k) != before.get(k))
            problems.append(f"configuration {name!r} changed ({', '.join(fields)})")
    if stored.get("baseline") and new.get("baseline") and stored["baseline"] != new["baseline"]:
        problems.append(f"baseline: stored {stored['baseline']!r}, now {new['baseline']!r}")
    check_resume({**_COMPARED_DEFAULTS, **stored}, new, where, f"{where}/{RUN_FILE}", skip=skip, problems=problems)
    merged = dict(stored)
    merged["configs"] = {**stored.get("configs", {}), **new.get("configs", {})}
    merged["baseline"] = stored.get("baseline") or new.get("baseline")
    if stored.get("vps_version") != new.get("vps_version"):
        warnings.warn(f"{where} was written by vps {stored.get('vps_version')}, this is {new.get('vps_version')}",
                      stacklevel=3)
    return merged


# -- the output directory --------------------------------------------------------------------------
class RunDir:
    """``run.json`` and the append-only ``results.jsonl`` of one output directory.

    ``rows`` names the rows file that `read_rows` and `append` use: ``results.jsonl``, or a data-parallel
    rank's own file (`for_rank`).
    """

    def __init__(self, path: str | Path, rows: str = RESULTS_FILE) -> None:
        self.path = Path(path)
        self.results = self.path / rows
        self.run_file = self.path / RUN_FILE
        self.lock_file = self.path / LOCK_FILE

    def for_rank(self, rank: int) -> RunDir:
        """This directory with data-parallel rank ``rank``'s rows file (``rows.rank{rank}.jsonl``) as its rows."""
        return RunDir(self.path, rank_rows_name(rank))

    def rank_files(self) -> list[Path]:
        """The rank rows files in the directory, by rank."""
        if not self.path.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.path.iterdir() if (m := _RANK_ROWS.fullmatch(p.name))]
        return [p for _, p in sorted(found)]

    def check_target(self) -> None:
        """Refuse a path this run cannot write to, before anything is written: a file (or a path
        below one), or an existing directory that is not a run directory (no run.json) but holds
        files a run writes (report.md, summary.json, report.png, results.jsonl), which it would
        overwrite or mix with. Raises ValueError / `RunMismatchError` naming the path."""
        check_directory(self.path)
        if not self.path.is_dir() or self.run_file.exists():
            return
        for rows in (self.path / RESULTS_FILE, *self.rank_files()):
            if rows.exists() and rows.stat().st_size > 0:
                raise RunMismatchError(f"{rows} exists without {self.run_file}; refusing to mix results")
        foreign = [name for name in _REPORT_FILES if (self.path / name).exists()]
        if foreign:
            raise RunMismatchError(
                f"{self.path} holds {', '.join(foreign)} but no {RUN_FILE}: it is not a run directory, and "
                f"refusing to overwrite it; use another directory")

    @contextlib.contextmanager
    def lock(self, rank: int | None = None) -> Iterator[RunDir]:
        """The directory's exclusive lock (``.lock``), or with ``rank`` that data-parallel rank's own
        (``.lock.rank{rank}``), held for the block (see `lock_directory`)."""
        with lock_directory(self.path, LOCK_FILE if rank is None else rank_lock_name(rank)):
            yield self

    def read_settings(self) -> dict[str, Any] | None:
        """run.json's settings, or None where the directory has none (`vps._io.read_json_object`)."""
        return read_json_object(self.run_file) if self.run_file.exists() else None

    def prepare(self, settings: dict[str, Any], write: bool = True) -> tuple[dict[str, Any], list[str]]:
        """Create or check run.json; returns the stored settings and the names of newly added configs.

        ``write`` False checks and returns the same without writing (a data-parallel rank other than 0).
        """
        self.check_target()
        self.path.mkdir(parents=True, exist_ok=True)
        stored = self.read_settings()
        if stored is None:
            merged, added = settings, []
        else:
            merged = merge_settings(stored, settings, str(self.path))
            added = [n for n in settings.get("configs", {}) if n not in stored.get("configs", {})]
        if write and merged != stored:
            write_atomic(self.run_file, dumps_strict(merged, indent=2) + "\n")
        return merged, added

    def read_rows(self, repair: bool = False) -> list[dict[str, Any]]:
        """Every complete row, first occurrence of each (id, config) kept.

        A final line that does not parse (a write cut off by a kill) is ignored with a warning;
        ``repair`` also cuts it from the file so appends start on a fresh line. An unparsable line
        anywhere else is an error naming the line.
        """
        if not self.results.exists():
            return []
        raw = self.results.read_bytes()
        lines = raw.split(b"\n")
        ends_clean = raw.endswith(b"\n") or not raw
        if ends_clean:
            lines = lines[:-1]
        rows: list[dict[str, Any]] = []
        seen: set[tuple[str, str]] = set()
        offset = 0
        for number, line in enumerate(lines, start=1):
            last = number == len(lines)
            try:
                row = json.loads(line) if line.strip() else None
                if row is not None and not isinstance(row, dict):
                    raise ValueError("not a JSON object")
            except ValueError as exc:
                if not last:
                    raise RunMismatchError(f"{self.results}:{number}: unparsable line ({exc}); the file was "
                                           f"changed by something other than the harness") from None
                warnings.warn(f"{self.results}:{number}: ignoring an unparsable final line (a write cut off "
                              f"by an interruption); that item will be run again", stacklevel=2)
                if repair:
                    with self.results.open("r+b") as fh:
                        fh.truncate(offset)
                        fh.flush()
                        os.fsync(fh.fileno())
                break
            offset += len(line) + 1
            if row is None:
                continue
            if last and not ends_clean and repair:
                with self.results.open("ab") as fh:
                    fh.write(b"\n")
            problem = row_problem(row)
            if problem:
                raise RunMismatchError(f"{self.results}:{number}: {problem}; the file was changed by something other "
                                       f"than the harness")
            key = _row_key(row)
            if key in seen:
                warnings.warn(f"{self.results}:{number}: duplicate row for id {key[0]!r} config {key[1]!r}; "
                              f"keeping the first", stacklevel=2)
                continue
            seen.add(key)
            rows.append(row)
        return rows

    def append(self, rows: Sequence[dict[str, Any]]) -> None:
        """Append rows as one write, flushed and fsynced, so a batch is either on disk or not.

        Rows are strict JSON: a non-finite float is written as null ("no value").
        """
        if not rows:
            return
        payload = rows_payload(rows)
        with self.results.open("ab") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())

    def merge_rank_files(self, order: Callable[[dict[str, Any]], Any] | None = None) -> list[dict[str, Any]]:
        """Move every rank file's rows into ``results.jsonl``; returns all of its rows (`read_rows`).

        ``results.jsonl`` is repaired first (`read_rows` with ``repair``) and its rows stay as they are;
        a rank row whose (id, config) it already holds is dropped; the new rows are appended in one
        write, sorted by ``order`` (stable), and the rank files are deleted afterwards, so a kill
        in between leaves rows that the next merge drops as duplicates. A rank file's cut-off final
        line is ignored with a warning (its item runs again). The caller holds the directory's lock,
        and no rank is writing. Without rank files this is ``read_rows(repair=True)``.
        """
        rows = self.read_rows(repair=True)
        files = self.rank_files()
        if not files:
            return rows
        seen = {_row_key(r) for r in rows}
        new: list[dict[str, Any]] = []
        for path in files:
            for row in RunDir(self.path, path.name).read_rows():
                if _row_key(row) not in seen:
                    seen.add(_row_key(row))
                    new.append(row)
        if order is not None:
            new.sort(key=order)
        self.append(new)
        for path in files:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        return rows + new
