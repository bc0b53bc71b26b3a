"""VPS inside lm-evaluation-harness: the ``vps`` / ``vps-base`` model classes and the offline GSM8K task.

Nothing here imports lm-eval until it is asked for: `register` imports `vps.lmeval.model`, whose
classes register themselves with lm-eval's model registry; `TASKS_DIR` is the folder of the bundled
task files, added to lm-eval's task search path by ``vps lm-eval`` (see `vps.lmeval.cli`).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["MODEL_NAMES", "TASKS_DIR", "register"]

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
MODEL_NAMES = ("vps", "vps-base")


def register() -> None:
    """Register ``vps`` and ``vps-base`` with lm-eval's model registry (imports lm-eval).

    Raises:
        ImportError: lm-eval is not installed (``pip install vps[lm-eval]``).
    """
    from . import model  # noqa: F401  (importing the module registers its classes)
