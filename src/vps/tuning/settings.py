"""`TuneSettings`: everything that decides a study's numbers, stored in ``tune.json`` and checked on resume."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .._version import __version__
from ..prompting import DEFAULT_SHOTS, DEFAULT_STYLE, PromptSettings
from ..setting_flags import flag_field, flag_fields

__all__ = ["NOT_COMPARED", "OBJECTIVES", "PRUNERS", "TUNE_FORMAT", "TuneSettings"]

TUNE_FORMAT = 1
OBJECTIVES = ("nll", "overhead")
PRUNERS = ("median", "none")
# Stored for the record; a resumed study may differ in them (`vps._io.check_resume` compares the rest).
NOT_COMPARED = ("format", "vps_version")


@dataclass(frozen=True)
class TuneSettings:
    """A study's settings. ``data`` describes the items (source, path, sample, seed, count); ``space`` is
    `SearchSpace.to_dict`; ``objectives`` is ``("nll",)`` or ``("nll", "overhead")`` (a Pareto front,
    without pruning: Optuna prunes single-objective studies only). ``pruner`` "median" stops a trial
    whose running mean after a batch is worse than the median of earlier trials at that batch, once
    ``prune_startup`` trials have finished and after ``prune_warmup`` batches. ``on_test`` marks a study
    tuned on a test split (only with an explicit override): every output says so. ``prompt``, ``shots`` and
    ``system`` are checked by `PromptSettings` (`vps.prompting.PromptSettingError`, naming the field)."""

    model: str
    data: dict[str, Any]
    space: dict[str, Any]
    dtype: str = "float32"
    prompt: str = DEFAULT_STYLE
    shots: int = DEFAULT_SHOTS
    system: str | None = None
    # `flag_field`s: ``vps tune`` builds these flags from their declaration here (default, help, choices, bound).
    batch_size: int = flag_field(8, "--batch-size", "items per batch (default %(default)s)", low=1)
    objectives: tuple[str, ...] = ("nll",)
    pruner: str = flag_field("median", "--pruner", "median (default): stop a trial whose running mean after a batch "
                             "is worse than the median of earlier trials there; none", choices=PRUNERS)
    prune_startup: int = flag_field(5, "--prune-startup", "trials that finish before any is pruned (default "
                                    "%(default)s)", low=0)
    prune_warmup: int = flag_field(1, "--prune-warmup", "batches a trial runs before it can be pruned (default "
                                   "%(default)s)", low=0)
    seed: int = 0
    on_test: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "objectives", tuple(self.objectives))
        if not self.objectives or self.objectives[0] != "nll" or len(set(self.objectives)) != len(self.objectives) \
                or any(o not in OBJECTIVES for o in self.objectives):
            raise ValueError(f"objectives must be nll or nll,overhead, got {','.join(self.objectives)}")
        if self.pruner not in PRUNERS:
            raise ValueError(f"pruner must be one of {PRUNERS}, got {self.pruner!r}")
        PromptSettings(self.prompt, self.shots, self.system)  # the prompt's own rules
        for f in flag_fields(TuneSettings):
            low = f.metadata["low"]
            if low is not None and getattr(self, f.name) < low:
                raise ValueError(f"{f.name} must be >= {low}, got {getattr(self, f.name)}")

    @property
    def prunes(self) -> bool:
        return self.pruner != "none" and len(self.objectives) == 1

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["objectives"] = list(self.objectives)
        return {"format": TUNE_FORMAT, "vps_version": __version__, **out}

    def fingerprint(self) -> dict[str, Any]:
        """What the unpatched NLLs depend on."""
        d = self.to_dict()
        return {k: d[k] for k in ("model", "data", "dtype", "prompt", "shots", "system")}

