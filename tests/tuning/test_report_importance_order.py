"""The tune report's parameter importances come in one order whatever Python's hash seed (RESULTS.md
regenerates byte-identical): Optuna orders tied importances by string hashing."""

from __future__ import annotations

import optuna
import optuna.importance
import pytest

from vps.tuning.report import _importances


class _Trial:
    state = optuna.trial.TrialState.COMPLETE


class _Study:
    def get_trials(self, deepcopy: bool = False) -> list[_Trial]:
        return [_Trial(), _Trial(), _Trial()]


@pytest.mark.parametrize("found", [
    {"tau": 0.5, "gamma": 0.006, "blocks": 0.006, "builder": 0.006 + 1e-17, "rank": 0.002},
    {"rank": 0.002, "builder": 0.006, "blocks": 0.006 + 1e-17, "gamma": 0.006, "tau": 0.5},
])
def test_importances_are_ordered_by_value_then_name(monkeypatch, found):
    monkeypatch.setattr(optuna.importance, "get_param_importances", lambda *a, **k: dict(found))
    got, why = _importances(_Study())
    assert why is None
    got.pop("__evaluator__")
    assert list(got) == ["tau", "blocks", "builder", "gamma", "rank"]
    assert got == found  # values untouched
