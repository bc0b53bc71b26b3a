"""The run directory of an evaluation: ``run.json``, the append-only ``results.jsonl``, its lock, strict JSON.

``run.json`` holds the run's settings, ``results.jsonl`` one row per (item id, config name), appended
as each batch completes (one write, flushed and fsynced). A final line cut off mid-write is dropped
with a warning on the next read. A rerun whose settings differ is refused by `merge_settings` rather
than mixing results.

One process at a time works in a run directory: `RunDir.lock` takes an exclusive lock on
``<dir>/.lock`` (``flock``; the file records the holder's pid and host) for the whole run. A second
process is refused with `RunLockedError` naming the holder. The kernel drops the lock when its
process exits, however it exits (SIGKILL included), so a lock file left by a dead process is stale
and the next run takes it over.

A data-parallel run (`vps.evaluation.distributed`) works in the same directory with several processes:
rank R appends to its own ``rows.rank{R}.jsonl`` under its own lock ``.lock.rank{R}`` (a second process
of the same rank is refused; different ranks do not block each other), rank 0 also holds ``.lock`` (so
a single-process run or another launch is refused), and rank 0 moves the rank files' rows into
``results.jsonl`` (`RunDir.merge_rank_files`) before the ranks start and after they have all finished.
Outside a running launch, rank files are what an interrupted launch left; the next run merges them.

Every JSON file written here is strict JSON: a non-finite float (NaN, inf) is written as ``null``
(`finite_json`), never as the ``NaN`` / ``Infinity`` that strict readers reject.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import socket
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "LOCK_FILE", "RESULTS_FILE", "RUN_FILE", "RunDir", "RunLockedError", "RunMismatchError", "dumps_strict",
    "finite_json", "merge_settings", "rank_lock_name", "rank_rows_name", "write_atomic",
]

RESULTS_FILE = "results.jsonl"
RUN_FILE = "run.json"
LOCK_FILE = ".lock"
# A data-parallel rank's rows file and lock (see the module docstring).
_RANK_ROWS = re.compile(r"rows\.rank(\d+)\.jsonl")
# Files a run directory's report writes (vps.evaluation.report): a directory holding one of them
# without a run.json is not a run directory, and is not overwritten.
_REPORT_FILES = ("report.md", "summary.json", "report.png")
# Keys of run.json that describe the run but may differ between a run and its resumption.
# Settings of how a run computes, not of what it measures: the value stored by a run's first invocation
# is kept for the whole run, so every row of a run is computed the same way and its cost ratios stay
# comparable. The value is what runs written before the setting existed did. All but refine_sampling
# change no number beyond float rounding; refine_sampling changes which random draws the
# self-consistency samples get (not their distribution), so a run keeps it to stay reproducible.
_KEPT_FROM_FIRST_RUN = {"batch_order": "input", "nll_scoring": "recompute", "refine_batching": "item",
                        "refine_sampling": "global"}
# Compared settings that runs written before they existed lack; the value is what those runs did.
_COMPARED_DEFAULTS = {"prompt": "tutor"}
# "imported": where rows copied from another run came from (vps.evaluation.baseline), a record, not a setting.
_NOT_COMPARED = {"format", "vps_version", "command", "baseline", "configs", "data.source", "data.path",
                 "data.skipped", "imported", *_KEPT_FROM_FIRST_RUN}


class RunMismatchError(ValueError):
    """The output directory holds a run with different settings (or is not a run directory)."""


class RunLockedError(RuntimeError):
    """Another process holds the run directory's lock."""


def rank_rows_name(rank: int) -> str:
    """The rows file of a data-parallel run's rank ``rank``: ``rows.rank{rank}.jsonl``."""
    return f"rows.rank{rank}.jsonl"


def rank_lock_name(rank: int) -> str:
    """The lock file of a data-parallel run's rank ``rank``: ``.lock.rank{rank}``."""
    return f"{LOCK_FILE}.rank{rank}"


def _row_key(row: dict[str, Any]) -> tuple[str, str]:
    return str(row.get("id")), str(row.get("config"))


# -- strict JSON -------------------------------------------------------------------------------------
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


def _jsonable(value: Any) -> Any:
    """JSON fallback for refine traces: dataclasses, tensors, numpy scalars, sets."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    return repr(value)


def finite_json(value: Any, fallback: Callable[[Any], Any] = _jsonable) -> Any:
    """``value`` as plain JSON data with every non-finite float (NaN, inf) replaced by None.

    None (JSON null) then means "no value": a loss with no evidence, a statistic with no data.
    Objects JSON cannot hold go through ``fallback`` (default: dataclasses as dicts, tensors and numpy
    values as lists / numbers, sets as lists, anything else as its repr) and are converted in turn.
    """
    return _finite(value, fallback, 0)


def _finite(value: Any, fallback: Callable[[Any], Any], depth: int) -> Any:
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v, fallback, depth) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v, fallback, depth) for v in value]
    converted = fallback(value) if depth < 8 else repr(value)
    return _finite(converted, fallback, depth + 1)


def dumps_strict(value: Any, fallback: Callable[[Any], Any] = _jsonable, **kwargs: Any) -> str:
    """`json.dumps` of `finite_json` (``value``), refusing NaN / Infinity (``allow_nan=False``)."""
    return json.dumps(finite_json(value, fallback), allow_nan=False, **kwargs)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, so a reader sees the old or the new file."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def rows_payload(rows: Sequence[dict[str, Any]]) -> bytes:
    """What `RunDir.append` writes for ``rows``: one strict-JSON line per row."""
    return "".join(dumps_strict(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


# -- settings ------------------------------------------------------------------------------------------
def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _comparable_spec(spec: dict[str, Any]) -> dict[str, Any]:
    cfg = spec.get("config")
    if cfg is not None:
        from ..config import VPSConfig

        # A field added since a run was written takes its default, which is what that run did (a new
        # field always defaults to the old behaviour), so the run still resumes.
        cfg = {k: v for k, v in {**VPSConfig().to_dict(), **cfg}.items() if k != "version"}
    return {"method": spec.get("method"), "config": cfg, "votes": spec.get("votes")}


def merge_settings(stored: dict[str, Any], new: dict[str, Any], where: str) -> dict[str, Any]:
    """``stored`` extended with ``new``'s configurations; raises `RunMismatchError` on any difference."""
    old_flat, new_flat = _flatten({**_COMPARED_DEFAULTS, **stored}), _flatten(new)
    keys = {k for k in old_flat.keys() | new_flat.keys()
            if not any(k == skip or k.startswith(skip + ".") for skip in _NOT_COMPARED)}
    # Generation settings only matter when generating.
    if not new.get("generate") and not stored.get("generate"):
        keys -= {"max_new_tokens", "temperature", "stop_strings", "extract_mode"}
    differ = sorted(k for k in keys if old_flat.get(k) != new_flat.get(k))
    problems = [f"{k}: stored {old_flat.get(k)!r}, now {new_flat.get(k)!r}" for k in differ]
    for name, spec in new.get("configs", {}).items():
        old = stored.get("configs", {}).get(name)
        if old is not None and _comparable_spec(old) != _comparable_spec(spec):
            changed = _flatten(_comparable_spec(spec))
            before = _flatten(_comparable_spec(old))
            fields = sorted(k for k in changed.keys() | before.keys() if changed.get(k) != before.get(k))
            problems.append(f"configuration {name!r} changed ({', '.join(fields)})")
    if stored.get("baseline") and new.get("baseline") and stored["baseline"] != new["baseline"]:
        problems.append(f"baseline: stored {stored['baseline']!r}, now {new['baseline']!r}")
    if problems:
        raise RunMismatchError(
            f"{where} holds a run with different settings; refusing to mix results. Differences: "
            + "; ".join(problems) + ". Use another --out directory, or rerun with the stored settings "
            f"(see {where}/{RUN_FILE}).")
    merged = dict(stored)
    merged["configs"] = {**stored.get("configs", {}), **new.get("configs", {})}
    merged["baseline"] = stored.get("baseline") or new.get("baseline")
    if stored.get("vps_version") != new.get("vps_version"):
        warnings.warn(f"{where} was written by vps {stored.get('vps_version')}, this is {new.get('vps_version')}",
                      stacklevel=3)
    return merged


# -- the lock ------------------------------------------------------------------------------------------
# Locks this process holds: resolved lock path -> [fd, depth]. flock locks belong to an open file, so a
# second open in the same process would conflict with the first; a nested lock (the CLI around
# run_evaluation) reuses the first instead.
_HELD: dict[str, list[int]] = {}
_HELD_GUARD = threading.Lock()


def _holder(path: Path) -> str:
    """'process PID on host HOST' as the lock file records it, or a note that it records nothing."""
    try:
        fields = path.read_text(encoding="utf-8", errors="replace").split()
    except OSError:
        fields = []
    if len(fields) >= 2:
        return f"process {fields[0]} on host {fields[1]}"
    return "a process that has not yet written its pid"


def _acquire(lock_path: Path) -> int:
    import fcntl

    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as exc:
            raise ValueError(f"{lock_path}: cannot create the lock file ({exc.strerror or exc})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunLockedError(
                f"{lock_path.parent} is in use by another run: {_holder(lock_path)} holds {lock_path}; wait "
                f"for it to finish or use another directory") from None
        except BaseException:
            os.close(fd)
            raise
        # A releasing holder unlinks the file before closing it: a lock on an unlinked file guards nothing.
        try:
            same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    # Whatever the file records is stale: its writer's flock is gone, so it is no longer running.
    record = f"{os.getpid()} {socket.gethostname() or 'localhost'}\n".encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, record, 0)
    os.fsync(fd)
    return fd


@contextlib.contextmanager
def lock_directory(directory: str | Path, name: str = LOCK_FILE) -> Iterator[Path]:
    """Hold an exclusive lock on ``directory`` (created if missing) until the block exits, however it exits.

    The lock is the file ``name`` in it (``.lock``; a data-parallel rank's own is `rank_lock_name`).
    Raises `RunLockedError` naming the holder's pid and host when another process holds it. A lock
    already held by this process is taken again (nested use).
    """
    directory = Path(directory)
    check_directory(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"{directory}: cannot create the directory ({exc.strerror or exc})") from None
    lock_path = directory / name
    key = os.path.realpath(lock_path)
    with _HELD_GUARD:
        held = _HELD.get(key)
        if held is not None:
            held[1] += 1
        else:
            _HELD[key] = [_acquire(lock_path), 1]
    try:
        yield lock_path
    finally:
        with _HELD_GUARD:
            held = _HELD[key]
            held[1] -= 1
            if held[1] == 0:
                del _HELD[key]
                with contextlib.suppress(OSError):
                    os.unlink(lock_path)
                os.close(held[0])


def check_directory(path: str | Path) -> None:
    """Refuse a path that cannot be a directory: a file, or below one (ValueError naming it)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} is a file, not a directory")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{path}: {parent} is a file, not a directory")
            break


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
        if not self.run_file.exists():
            return None
        try:
            data = json.loads(self.run_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise RunMismatchError(f"{self.run_file} is not valid JSON ({exc}); move the directory aside") from None
        except IsADirectoryError:
            raise RunMismatchError(f"{self.run_file} is a directory, not a file; move it aside") from None
        if not isinstance(data, dict):
            raise RunMismatchError(f"{self.run_file} must hold a JSON object")
        return data

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
