"""What a refinement call is doing, for a progress display.

A batch of refine-self on a 1.5B model on two CPU cores takes minutes (issue #30's voting run: its first
batch of 4 prompts took 10 min 51 s), and a bar that counts items alone stands still all that time. Inside
`phase_reports` the loop (and every draw of samples, which the vote methods share) hands a callback one
short line per phase it enters; ``vps eval`` shows it beside its bar, ``vps refine`` prints it on stderr. A
context variable carries the callback, so no signature between the harness and the loop changes. Kept free
of torch: the harness imports it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar

__all__ = ["phase_reports", "report_phase"]

_CALLBACK: ContextVar[Callable[[str], None] | None] = ContextVar("vps_refinement_phase", default=None)


@contextlib.contextmanager
def phase_reports(callback: Callable[[str], None] | None) -> Iterator[None]:
    """Inside the block, refinement calls ``callback`` with each phase it enters ("sampling 4 per prompt",
    "iteration 2/3: refinement step", ...); None reports nothing."""
    token = _CALLBACK.set(callback)
    try:
        yield
    finally:
        _CALLBACK.reset(token)


def report_phase(text: str) -> None:
    """Tell the callback of the enclosing `phase_reports` block, if any, that ``text`` starts now."""
    callback = _CALLBACK.get()
    if callback is not None:
        callback(text)
