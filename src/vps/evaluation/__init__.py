"""Evaluation utilities: loading items, running methods resumably (in one process or data-parallel), NLL,
paired statistics and reports.

Names load on first use, so that reading a run directory or the command line's choices does not
import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "METHODS": "ablation", "GridError": "ablation", "MethodSpec": "ablation", "default_grid_path": "ablation",
    "load_grid": "ablation", "parse_grid": "ablation",
    "Item": "data", "LoadResult": "data", "load_items": "data",
    "DistributedError": "distributed", "Shard": "distributed", "World": "distributed", "rank_session": "distributed",
    "shard_items": "distributed", "world_from_env": "distributed",
    "RunSettings": "harness", "data_info": "harness", "run_evaluation": "harness",
    "RunDir": "rundir", "RunLockedError": "rundir", "RunMismatchError": "rundir",
    "NLLResult": "nll", "solution_nll": "nll",
    "format_console": "report", "pair_stats": "report", "summarize_run": "report", "write_report": "report",
    "rescore_run": "rescore",
    "compare_paired": "stats", "mcnemar_exact": "stats", "paired_bootstrap_diff": "stats",
    "wilson_interval": "stats",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vps.evaluation' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
