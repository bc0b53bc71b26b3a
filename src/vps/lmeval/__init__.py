"""VPS inside lm-evaluation-harness: the ``vps`` / ``vps-base`` model classes and the offline GSM8K task.

From Python, one call runs lm-eval with both available::

    import vps.lmeval
    out = vps.lmeval.evaluate(model="vps", model_args={"pretrained": "smollm2-135m"}, tasks=["gsm8k_local"],
                              limit=8)

`evaluate` is ``lm_eval.simple_evaluate`` with the model classes registered and the bundled tasks on
the task search path. To call lm-eval yourself, pass ``task_manager=vps.lmeval.task_manager()``
(which registers the models too).

Importing this package does not import lm-eval (``vps lm-eval`` and ``vps --help`` import it only
when they need it): `register`, `task_manager` and `evaluate` do. `register` imports
`vps.lmeval.model`, whose classes register themselves with lm-eval's model registry; `TASKS_DIR` is
the folder of the bundled task files, which lm-eval does not search unless told to.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

__all__ = ["INSTALL_HINT", "MODEL_NAMES", "TASKS_DIR", "evaluate", "register", "task_manager"]

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
MODEL_NAMES = ("vps", "vps-base")
INSTALL_HINT = "pip install vps[lm-eval]"


def _require_lm_eval() -> None:
    """Import lm-eval, or say in one line that it is an optional extra and how to get it."""
    try:
        import lm_eval  # noqa: F401
    except ImportError as exc:
        if getattr(exc, "name", None) == "lm_eval":
            raise ImportError(f"lm-eval is not installed; {INSTALL_HINT}") from None
        raise


def register() -> None:
    """Register ``vps`` and ``vps-base`` with lm-eval's model registry (imports lm-eval). Repeated
    calls do nothing more.

    Raises:
        ImportError: lm-eval is not installed (the message says ``pip install vps[lm-eval]``).
    """
    _require_lm_eval()
    from . import model  # noqa: F401  (importing the module registers its classes)


def task_manager(include_path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
                 **kwargs: Any) -> TaskManager:
    """An lm-eval ``TaskManager`` that finds ``gsm8k_local`` as well as lm-eval's own tasks; the models
    are registered too, so ``lm_eval.simple_evaluate(model="vps", ..., task_manager=task_manager())``
    works as it stands.

    Args:
        include_path: further task folders, searched after the bundled one.
        **kwargs: passed to ``TaskManager`` (``include_defaults``, ``metadata``, ``verbosity``).

    Raises:
        ImportError: lm-eval is not installed.
    """
    register()
    from lm_eval.tasks import TaskManager

    if include_path is None:
        extra: list[str | os.PathLike[str]] = []
    elif isinstance(include_path, (str, os.PathLike)):
        extra = [include_path]
    else:
        extra = list(include_path)
    return TaskManager(include_path=[str(TASKS_DIR), *(str(p) for p in extra)], **kwargs)


def evaluate(model: Any = "vps", tasks: str | Sequence[Any] = ("gsm8k_local",), **kwargs: Any) -> Any:
    """``lm_eval.simple_evaluate`` with ``vps`` / ``vps-base`` registered and ``gsm8k_local`` findable.

    Args:
        model: ``"vps"`` (VPS on), ``"vps-base"`` (unpatched), any lm-eval model name, or an ``LM``
            instance such as `vps.lmeval.model.VPSLM`.
        tasks: task names (a single name is accepted as a string); default ``gsm8k_local``.
        **kwargs: ``simple_evaluate``'s own (``model_args`` as a dict or ``"k=v,..."`` string, ``limit``,
            ``batch_size``, ``gen_kwargs``, ``device``, ...). A ``task_manager`` given here is used as is;
            build it with `task_manager` so that it keeps the bundled tasks.

    Returns:
        What ``simple_evaluate`` returns: the results dict (``results``, ``configs``, ``samples``, ...),
        or None on the non-zero ranks of a distributed run.

    Raises:
        ImportError: lm-eval is not installed.
    """
    register()
    from lm_eval import simple_evaluate

    if kwargs.get("task_manager") is None:
        kwargs["task_manager"] = task_manager()
    names = [tasks] if isinstance(tasks, str) else list(tasks)
    return simple_evaluate(model=model, tasks=names, **kwargs)
