"""The file handling every resumable output directory shares (``vps eval`` / ``vps ablate`` runs, ``vps tune``
studies): strict JSON, atomic writes, the directory lock and the resume comparison.

Strict JSON: every JSON file vps writes holds a non-finite float (NaN, inf) as ``null`` (`finite_json`,
`dumps_strict`), never as the ``NaN`` / ``Infinity`` that strict readers reject; a settings file is read with
`read_json_object`, which names the file when it is not a JSON object.

Atomic writes (`write_atomic`): a file is written to a temporary file beside it, fsynced and moved into
place, so a reader sees the old file or the new one, never a part.

The lock (`lock_directory`): one process at a time works in a directory. It takes an exclusive lock on
``<dir>/.lock`` (``flock``; the file records the holder's pid and host) for the whole block, and a second
process is refused with `RunLockedError` naming the holder. The kernel drops the lock when its process
exits, however it exits (SIGKILL included), so a lock file left by a dead process is stale and the next
process takes it over.

The resume comparison (`check_resume`): a directory's settings file is compared with the settings of the
process that resumes it, and any difference is refused with `RunMismatchError` naming every differing
setting, rather than mixing results made with different settings.

This module imports only the standard library, so that a helper process can load it alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import socket
import threading
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "LOCK_FILE", "RunLockedError", "RunMismatchError", "check_directory", "check_resume", "dumps_strict",
    "finite_json", "flatten", "lock_directory", "read_json_object", "write_atomic",
]

LOCK_FILE = ".lock"


class RunMismatchError(ValueError):
    """The output directory holds a run (or study) with different settings, or is not such a directory."""


class RunLockedError(RuntimeError):
    """Another process holds the directory's lock."""


# -- strict JSON -------------------------------------------------------------------------------------
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


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in the settings file ``path``; `RunMismatchError` naming the file when it is not valid
    JSON, not an object, or a directory."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RunMismatchError(f"{path} is not valid JSON ({exc}); move the directory aside") from None
    except IsADirectoryError:
        raise RunMismatchError(f"{path} is a directory, not a file; move it aside") from None
    if not isinstance(data, dict):
        raise RunMismatchError(f"{path} must hold a JSON object")
    return data


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, so a reader sees the old or the new file."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# -- the resume comparison ------------------------------------------------------------------------------
def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one dict keyed by dotted names (``{"data": {"seed": 0}}`` -> ``{"data.seed": 0}``)."""
    flat: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def check_resume(stored: Mapping[str, Any], new: Mapping[str, Any], where: str, settings_file: str | Path, *,
                 kind: str = "run", skip: Collection[str] = (), problems: Sequence[str] = ()) -> None:
    """Refuse to resume the ``kind`` ("run", "study") in ``where`` with settings ``new`` when they differ from the
    ``stored`` ones (read from ``settings_file``), raising `RunMismatchError` that names every difference.

    Settings are compared key by key, nested dicts by their dotted keys (`flatten`), except the keys in
    ``skip`` and the keys below them (``"data.path"`` skips ``data.path``; ``"data"`` all of ``data.*``).
    ``problems`` are differences the caller found itself, named in the same message.
    """
    old_flat, new_flat = flatten(stored), flatten(new)
    keys = {k for k in old_flat.keys() | new_flat.keys()
            if not any(k == s or k.startswith(s + ".") for s in skip)}
    differ = sorted(k for k in keys if old_flat.get(k) != new_flat.get(k))
    found = [f"{k}: stored {old_flat.get(k)!r}, now {new_flat.get(k)!r}" for k in differ] + list(problems)
    if found:
        raise RunMismatchError(
            f"{where} holds a {kind} with different settings; refusing to mix results. Differences: "
            + "; ".join(found) + f". Use another --out directory, or rerun with the stored settings (see "
            f"{settings_file}).")


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

    The lock is the file ``name`` in it (``.lock``; a data-parallel rank's own is
    `vps.evaluation.rundir.rank_lock_name`). Raises `RunLockedError` naming the holder's pid and host when
    another process holds it. A lock already held by this process is taken again (nested use).
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
