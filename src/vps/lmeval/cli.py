"""Run lm-eval's own command line with the VPS model classes and the bundled tasks registered.

lm-eval's ``lm-eval`` script knows only the models in its own registry and the tasks under its own
folder; `run_lm_eval` registers ``vps`` / ``vps-base`` first and adds `TASKS_DIR` to the task
search path (``--include_path``), then hands every argument to lm-eval unchanged.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence

from . import INSTALL_HINT, TASKS_DIR, register

__all__ = ["INSTALL_HINT", "lm_eval_argv", "run_lm_eval"]

_HELP = ("-h", "--help")


def lm_eval_argv(args: Sequence[str]) -> list[str]:
    """The arguments lm-eval's parser receives: ``args`` plus ``--include_path`` of the bundled tasks.

    A bare help request is passed as it is (it prints lm-eval's overview). When ``args`` name their
    own ``--include_path``, lm-eval's parser keeps only one path, so theirs is kept and a warning says
    that the bundled tasks are then not found.
    """
    argv = list(args)
    if not argv or argv[0] in _HELP:
        return argv
    if any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
        warnings.warn(f"--include_path replaces the bundled task directory {TASKS_DIR}, so gsm8k_local is found only "
                      f"if that path holds a copy of it", stacklevel=2)
        return argv
    return [*argv, "--include_path", str(TASKS_DIR)]


def run_lm_eval(args: Sequence[str]) -> int:
    """``lm-eval ARGS...`` in this process, with ``--model vps`` / ``vps-base`` and ``gsm8k_local`` available.

    Returns 0 when lm-eval returns; its argument errors exit as its parser decides (SystemExit).

    Raises:
        RuntimeError: lm-eval is not installed (the message says ``pip install vps[lm-eval]``).
    """
    try:
        import lm_eval  # noqa: F401
        from lm_eval.__main__ import cli_evaluate
    except ImportError as exc:
        missing = getattr(exc, "name", None) in ("lm_eval", "lm_eval.__main__")
        why = "lm-eval is not installed" if missing else f"lm-eval could not be imported ({exc})"
        raise RuntimeError(f"{why}; {INSTALL_HINT}") from None
    register()
    # lm-eval's entry point reads sys.argv (in every version this package supports), so the
    # arguments go in there for the duration of the call.
    saved = sys.argv
    sys.argv = ["lm-eval", *lm_eval_argv(args)]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0
