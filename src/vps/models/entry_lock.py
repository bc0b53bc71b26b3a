"""An exclusive, waiting file lock per model-cache entry, so that one process builds an entry at a time.

Converting a bundled GGUF is expensive (the 1.5B model peaks at 13.6 GB of memory for about three
minutes), so two processes that find the same entry missing must not both build it: the second waits
for the first, then loads what the first published. The lock is ``fcntl.flock`` on a small file that
holds the pid of the process building the entry, so a waiter can say whom it waits for. The kernel
drops the lock when its holder exits, however it exits, so a killed build never blocks the next one.

The lock files are left in place: deleting one while another process has it open (or is about to
open it) would let a third process lock a different file of the same name.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["entry_lock"]


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextmanager
def entry_lock(path: Path, what: str, say: Callable[[str], None] = _say) -> Iterator[bool]:
    """Hold an exclusive lock on the file ``path`` (created if missing) for the block.

    When another process holds it, ``say`` is called once with a line naming ``what`` is being built
    and that process's pid (where it recorded one), and the call blocks until the lock is free; Ctrl-C
    interrupts the wait. Yields whether it had to wait, so that the caller knows to look again for
    the entry the other process may have finished.
    """
    import fcntl  # POSIX only, as is the run-directory lock of vps eval

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        waited = False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            waited = True
            holder = _recorded_pid(fd)
            who = f"pid {holder}" if holder is not None else "pid not recorded yet"
            say(f"vps: waiting for another process ({who}) converting the same model {what} (lock {path}); "
                f"it is loaded from the cache once that process finishes")
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield waited
        finally:
            # Emptied before release, so that the next waiter never names a process that has finished.
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock


def _recorded_pid(fd: int) -> int | None:
    """The pid the lock's holder wrote, or None where it has not written one yet (or it is unreadable)."""
    text = os.pread(fd, 32, 0).decode("ascii", errors="replace").strip()
    return int(text) if text.isdigit() else None
