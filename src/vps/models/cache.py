"""The conversion cache: where entries live, which of them a load may use, and how one is published.

An entry is a float32 safetensors checkpoint (model + tokenizer) under ``cache_dir()/models/<key>``,
complete once its marker file is written. It is built in a temporary sibling directory whose name
holds the builder's pid and renamed into place only when complete (`publish`), so an interrupted run
never leaves a half-written entry that a later load would pick up; the scratch directories of dead
processes are removed on the next look. One process builds an entry at a time (`exclusive_build`,
over `vps.models.entry_lock`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .entry_lock import entry_lock
from .pins import BUNDLED

__all__ = ["CACHE_FORMAT", "MARKER", "TMP_PREFIX", "build_dir", "cache_dir", "cache_entry", "cached_models",
           "exclusive_build", "models_root", "owner_alive", "publish", "remove_dead_tmp_dirs", "usable_meta"]

MARKER = "vps-cache.json"
# Bumped whenever the conversion changes, so entries made by older code are rebuilt, not trusted.
CACHE_FORMAT = 1
TMP_PREFIX = ".tmp-"


def cache_dir() -> Path:
    """The VPS cache root: ``$VPS_CACHE_DIR``, else ``$XDG_CACHE_HOME/vps``, else ``~/.cache/vps``."""
    if os.environ.get("VPS_CACHE_DIR"):
        return Path(os.environ["VPS_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "vps"


def models_root() -> Path:
    """The directory of the entries (and of their scratch directories while they are built)."""
    return cache_dir() / "models"


def cached_models() -> list[dict[str, Any]]:
    """Complete cache entries, sorted by name.

    Each is a dict with ``name`` (the cache key), ``alias`` (the bundled alias, or None for a
    converted local GGUF), ``source`` (where it was converted from), ``path``, ``size_bytes`` and
    ``gguf_sha256`` (the verified digest of the GGUF it was converted from; None for local GGUF
    files and for entries made before the bundled GGUFs were pinned).
    """
    root = models_root()
    if not root.is_dir():
        return []
    entries = []
    for path in sorted(root.iterdir()):
        meta = None if path.name.startswith(".") else usable_meta(path)
        if meta is None:
            continue
        entries.append(
            {
                "name": path.name,
                "alias": path.name if path.name in BUNDLED else None,
                "source": meta.get("source"),
                "path": str(path),
                "size_bytes": sum(f.stat().st_size for f in path.rglob("*") if f.is_file()),
                "gguf_sha256": meta.get("gguf_sha256"),
            }
        )
    return entries


def cache_entry(key: str) -> Path | None:
    """The usable cache entry for `key`, if any; cleans up temp dirs left by dead processes."""
    root = models_root()
    if not root.is_dir():
        return None
    remove_dead_tmp_dirs(root, f"{TMP_PREFIX}{key}-*")
    entry = root / key
    return entry if usable_meta(entry) is not None else None


def remove_dead_tmp_dirs(root: Path, pattern: str) -> None:
    """Remove the scratch dirs under ``root`` matching ``pattern`` whose process has exited."""
    for tmp in root.glob(pattern):
        if not owner_alive(tmp.name):
            shutil.rmtree(tmp, ignore_errors=True)


def usable_meta(entry: Path) -> dict[str, Any] | None:
    """The marker of a complete entry that a load would use, else None.

    A bundled alias's entry recording a GGUF digest other than the pinned one is ignored (and
    replaced by the next load): the pin changed, so it was made from a GGUF that is no longer the
    bundled one. Entries without a recorded digest predate the pins and are still used.
    """
    meta = _entry_meta(entry)
    source = BUNDLED.get(entry.name)
    if meta is not None and source is not None and meta.get("gguf_sha256", source.sha256) != source.sha256:
        return None
    return meta


def _entry_meta(entry: Path) -> dict[str, Any] | None:
    """The marker of a complete entry in the current format, else None."""
    try:
        meta = json.loads((entry / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == CACHE_FORMAT else None


def owner_alive(tmp_name: str) -> bool:
    """Whether the process whose pid a scratch dir's name holds (``-pid<N>-``) still runs."""
    match = re.search(r"-pid(\d+)-", tmp_name)
    if match is None:
        return False
    try:
        os.kill(int(match.group(1)), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def build_dir(key: str) -> Iterator[Path]:
    """A private scratch dir next to the cache entry; the pid lets other processes spot leftovers."""
    root = models_root()
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{key}-pid{os.getpid()}-", dir=root))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def publish(built: Path, key: str) -> Path:
    """Rename the complete checkpoint ``built`` into place as the entry ``key``; returns the entry."""
    entry = models_root() / key
    try:
        os.replace(built, entry)
    except OSError:
        if usable_meta(entry) is not None:  # another process finished the same entry first
            return entry
        # Debris (no marker: copied in by hand, half-deleted), an older format or a GGUF other
        # than the pinned one: replace it.
        shutil.rmtree(entry, ignore_errors=True)
        os.replace(built, entry)
    return entry


def _lock_path(key: str) -> Path:
    # Outside models/, so that the entries' directory holds entries and their scratch dirs only.
    return cache_dir() / "locks" / f"{key}.lock"


@contextmanager
def exclusive_build(key: str) -> Iterator[Path | None]:
    """Hold the build lock of the entry `key` for the block; yields the entry if it is complete by then.

    Looked up again under the lock because another process may have published it meanwhile: while
    this one waited for the lock, or between this one's first look and taking the lock.
    """
    with entry_lock(_lock_path(key), key) as waited:
        entry = cache_entry(key)
        if waited and entry is None:
            print(f"vps: the other process did not finish {key}; building it in this one (pid {os.getpid()})",
                  file=sys.stderr, flush=True)
        yield entry
