"""The names of what a study keeps in its run directory.

The study loop (`vps.tuning.study`) writes the settings and the Optuna storage and reads them back on a
rerun; the report (`vps.tuning.report`) writes the outputs and, in `refresh`, reads the settings and the
storage too; `vps tune` checks the settings before it loads a model. Every one of them names the files
from here, so that the names cannot drift apart.
"""

from __future__ import annotations

__all__ = ["BEST_FILE", "BEST_TRIAL_FILE", "CONFIRM_GRID", "REPORT_MD", "REPORT_PNG", "SETTINGS_FILE", "STUDY_FILE",
           "STUDY_NAME", "TRIALS_FILE"]

#: The Optuna study's name inside its storage.
STUDY_NAME = "vps-tune"
#: The settings; a rerun with other settings is refused.
SETTINGS_FILE = "tune.json"
#: The Optuna storage (SQLite).
STUDY_FILE = "study.db"
TRIALS_FILE = "trials.jsonl"
#: The best completed trial's `VPSConfig`, for ``vps eval --config``.
BEST_FILE = "best.json"
BEST_TRIAL_FILE = "best_trial.json"
#: The ablation grid that confirms the best configuration beside the seed defaults.
CONFIRM_GRID = "confirm.yaml"
REPORT_MD = "report.md"
REPORT_PNG = "report.png"
