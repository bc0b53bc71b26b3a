"""What a load shows while it works: the progress bars of downloads and conversions, and transformers' own.

Both follow ``VPS_QUIET``: set (to anything but ``0``) it hides them, so that scripted runs and tests
keep their stderr clean. Without it, the bars made here show only when stderr is a terminal.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tqdm import tqdm

__all__ = ["progress_bar", "quiet", "quiet_transformers", "step"]


def quiet() -> bool:
    """Whether ``VPS_QUIET`` asks for no progress output."""
    return os.environ.get("VPS_QUIET", "") not in ("", "0")


@contextmanager
def quiet_transformers(always: bool = False) -> Iterator[None]:
    """Silence transformers' own progress bars while VPS_QUIET is set (or ``always``)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if always or quiet():
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


@contextmanager
def step(bar: tqdm[Any], name: str) -> Iterator[None]:
    """One named step of ``bar``: shown as its postfix while it runs, counted once it is done."""
    bar.set_postfix_str(name)
    yield
    bar.update()


def progress_bar(desc: str, steps: int, unit: str = "step") -> tqdm[Any]:
    """A bar of ``steps`` steps on stderr, hidden under VPS_QUIET."""
    # disable=None hides the bar when stderr is not a terminal.
    return tqdm(total=steps, desc=desc, unit=unit, file=sys.stderr, disable=True if quiet() else None)
