"""Evaluation utilities: loading items, the methods' registry, running methods resumably (in one process or
data-parallel), NLL, paired statistics and reports.

Names load on first use, so that reading a run directory or the command line's choices does not
import torch.
"""

from __future__ import annotations

from .._lazy import lazy_exports

_EXPORTS = {
    "GridError": "ablation", "default_grid_path": "ablation", "load_grid": "ablation", "parse_grid": "ablation",
    "METHODS": "methods", "Method": "methods", "MethodSpec": "methods", "register": "methods",
    "unregister": "methods",
    "Item": "data", "LoadResult": "data", "load_items": "data",
    "DistributedError": "distributed", "Shard": "distributed", "World": "distributed", "rank_session": "distributed",
    "shard_items": "distributed", "world_from_env": "distributed",
    "run_evaluation": "harness", "RunSettings": "settings", "SettingError": "settings", "data_info": "settings",
    "RunDir": "rundir", "RunLockedError": "vps._io", "RunMismatchError": "vps._io",
    "NLLResult": "nll", "solution_nll": "nll",
    "format_console": "report", "pair_stats": "summary", "summarize_run": "summary", "write_report": "report",
    "rescore_run": "rescore",
    "compare_paired": "stats", "mcnemar_exact": "stats", "paired_bootstrap_diff": "stats",
    "wilson_interval": "stats",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
