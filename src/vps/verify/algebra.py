"""The ``algebraic`` loss: sympy equivalence, run in a sandbox process that can be killed.

A sympy ``simplify`` cannot be interrupted from inside Python (signals only reach the main
thread, and sympy may sit in one C call), so the check runs in a separate worker process
(``safe_sympy.py`` run as a script) that is killed when it overruns. The worker is a fresh
interpreter started with ``subprocess``, not a ``multiprocessing`` child: forking a process
that holds a model and its threads is unsafe, and ``spawn`` would re-import the caller's
``__main__``. The worker is started on first use, kept for later checks, and restarted
after it is killed.
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

from .quantity import Answer

__all__ = ["SympyWorker", "algebraic_loss", "default_worker"]

_WORKER_SCRIPT = str(Path(__file__).with_name("safe_sympy.py"))


def _pump(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    """Move the worker's output lines into a queue, so reads can time out; None marks EOF."""
    with stream:
        for line in stream:
            lines.put(line)
    lines.put(None)


def _decode(line: str | None) -> dict[str, Any] | None:
    """A reply line as a dict; None at EOF or for output that is not a JSON object."""
    if line is None:
        return None
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class SympyWorker:
    """A sandbox process answering equivalence checks; thread-safe, one check at a time.

    Args:
        startup_timeout: seconds allowed for the worker to start (importing sympy); this
            is separate from the per-check timeout, which covers the check alone.
    """

    def __init__(self, startup_timeout: float = 60.0) -> None:
        self.startup_timeout = startup_timeout
        self._proc: subprocess.Popen[str] | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._lock = threading.Lock()
        self._next_id = 0

    def _start(self) -> None:
        env = dict(os.environ)
        # The worker needs the same sympy the caller has, wherever that was found.
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        proc = subprocess.Popen(
            [sys.executable, "-u", _WORKER_SCRIPT],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            encoding="utf-8",
            env=env,
        )
        self._proc, self._lines = proc, queue.Queue()
        assert proc.stdout is not None
        threading.Thread(target=_pump, args=(proc.stdout, self._lines), daemon=True).start()
        try:
            ready = _decode(self._lines.get(timeout=self.startup_timeout))
        except queue.Empty:
            ready = None
        if ready is None or not ready.get("ready"):
            self._kill()
            raise RuntimeError("the sympy worker did not start")

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.kill()
        proc.wait(timeout=10)
        # stdout is left to the pump thread, which closes it at EOF; closing it here could
        # pull the file out from under a read in progress.
        if proc.stdin is not None:
            try:
                proc.stdin.close()
            except OSError:
                pass  # the pipe broke when the worker died; nothing left to flush

    def close(self) -> None:
        """Stop the worker process, if one is running."""
        with self._lock:
            self._kill()

    def check(self, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send one request to the worker and wait at most ``timeout`` seconds for the reply.

        Returns the worker's reply, or ``{"status": "timeout"}`` (the worker is killed),
        ``{"status": "crashed"}`` or ``{"status": "unavailable", "error": ...}``.
        """
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                try:
                    self._kill()
                    self._start()
                except (OSError, RuntimeError, ValueError) as err:
                    return {"status": "unavailable", "error": str(err)}
            assert self._proc is not None and self._proc.stdin is not None
            self._next_id += 1
            request_id = self._next_id
            try:
                self._proc.stdin.write(json.dumps({**request, "id": request_id}) + "\n")
                self._proc.stdin.flush()
            except OSError:
                self._kill()
                return {"status": "crashed"}
            deadline = time.monotonic() + timeout
            while True:
                try:
                    line = self._lines.get(timeout=max(deadline - time.monotonic(), 0.0))
                except queue.Empty:
                    self._kill()
                    return {"status": "timeout"}
                reply = _decode(line)
                if reply is None:
                    self._kill()
                    return {"status": "crashed"}
                if reply.get("id") == request_id:
                    return reply


_default_worker: SympyWorker | None = None
_default_lock = threading.Lock()


def default_worker() -> SympyWorker:
    """The worker shared by all verifiers in this process (stopped at exit)."""
    global _default_worker
    with _default_lock:
        if _default_worker is None:
            _default_worker = SympyWorker()
            atexit.register(_default_worker.close)
        return _default_worker


def algebraic_loss(
    pred: Answer | None,
    gold: Answer | None,
    rel_tol: float,
    timeout: float,
    worker: SympyWorker | None = None,
) -> tuple[float | None, dict[str, Any]]:
    """0.0 when the predicted and gold answers are the same expression, 1.0 when not.

    No evidence (None) when either answer is missing, when both are plain numbers (the
    numeric component already scores those), when either side does not parse, or when
    the check does not finish within ``timeout`` seconds (``details["reason"] == "timeout"``).
    """
    if pred is None or gold is None:
        return None, {"reason": "no prediction" if pred is None else "no gold"}
    if pred.number is not None and gold.number is not None:
        return None, {"reason": "both answers are numbers; the numeric component scores them"}
    request = {
        "a": pred.text,
        "b": gold.text,
        "rel_tol": rel_tol,
        "a_num": pred.number,
        "b_num": gold.number,
    }
    reply = (worker or default_worker()).check(request, timeout)
    status = reply.get("status")
    if status == "ok":
        return (0.0 if reply["equal"] else 1.0), {"equal": reply["equal"], "method": reply["method"]}
    if status == "parse_error":
        return None, {"reason": "parse_error", "side": reply.get("side"), "error": reply.get("error")}
    if status == "timeout":
        return None, {"reason": "timeout", "timeout_s": timeout}
    return None, {"reason": status or "error", "error": reply.get("error")}
