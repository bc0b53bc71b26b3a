"""Evaluation utilities: loading items, running methods resumably, NLL, paired statistics and reports."""

from .ablation import METHODS, GridError, MethodSpec, default_grid_path, load_grid, parse_grid
from .data import Item, LoadResult, load_items
from .harness import RunDir, RunLockedError, RunMismatchError, RunSettings, data_info, run_evaluation
from .nll import NLLResult, solution_nll
from .report import format_console, pair_stats, summarize_run, write_report
from .rescore import rescore_run
from .stats import compare_paired, mcnemar_exact, paired_bootstrap_diff, wilson_interval

__all__ = [
    "METHODS", "GridError", "Item", "LoadResult", "MethodSpec", "NLLResult", "RunDir", "RunLockedError",
    "RunMismatchError", "RunSettings", "compare_paired", "data_info", "default_grid_path", "format_console",
    "load_grid", "load_items", "mcnemar_exact", "pair_stats", "paired_bootstrap_diff", "parse_grid", "rescore_run",
    "run_evaluation", "solution_nll", "summarize_run", "wilson_interval", "write_report",
]
