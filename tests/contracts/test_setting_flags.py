"""Settings declare their flags once (`vps.setting_flags.flag_field` metadata on `RunSettings` and
`TuneSettings`): the flags of ``vps eval``, ``vps ablate`` and ``vps tune``, their defaults, choices and bounds,
and the flag an error names are all read from there."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from vps.commands.common import add_run_arguments, run_setting_values
from vps.evaluation.settings import RunSettings, SettingError, flag_of, run_flag_fields
from vps.verify import EXTRACT_MODES


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    return parser.parse_args(list(argv))


def test_defaults_of_the_flags_are_the_fields_defaults():
    assert run_setting_values(_parse()) == {f.name: f.default for f in run_flag_fields()
                                            if not f.metadata["repeatable"]}
    settings = RunSettings(model="m", data={}, **run_setting_values(_parse()))
    assert settings == RunSettings(model="m", data={})


def test_every_declared_flag_sets_its_field():
    given = {"max_new_tokens": ("--max-new-tokens", "17", 17), "temperature": ("--temperature", "0.5", 0.5),
             "extract_mode": ("--extract", "strict", "strict"), "refine_iters": ("--iters", "2", 2),
             "refine_k_samples": ("--k-samples", "3", 3)}
    argv = [a for flag, text, _ in given.values() for a in (flag, text)] + ["--stop", "END", "--stop", "X"]
    values = run_setting_values(_parse(*argv))
    assert values == {name: want for name, (_, _, want) in given.items()} | {"stop_strings": ["END", "X"]}
    assert set(values) == {f.name for f in run_flag_fields()}  # no declared flag left untested
    settings = RunSettings(model="m", data={}, **values)
    assert settings.max_new_tokens == 17 and settings.stop_strings == ["END", "X"]


def test_choices_come_from_the_declaration():
    with pytest.raises(SystemExit):
        _parse("--extract", "loose")
    field = next(f for f in run_flag_fields() if f.name == "extract_mode")
    assert field.metadata["choices"] == EXTRACT_MODES


def test_every_setting_an_error_can_name_has_a_flag():
    # Fields set by no flag: what `vps eval` derives itself (data, generate, nll, command).
    derived = {"data", "generate", "nll", "command"}
    for f in dataclasses.fields(RunSettings):
        assert (flag_of(f.name) is None) == (f.name in derived), f.name
    with pytest.raises(SettingError) as info:
        RunSettings(model="m", data={}, refine_iters=0)
    assert flag_of(info.value.field) == "--iters"


def test_vps_tune_builds_its_declared_flags_from_tune_settings():
    from vps.commands import tune as tune_cmd
    from vps.setting_flags import flag_fields
    from vps.tuning.settings import PRUNERS, TuneSettings

    parser = argparse.ArgumentParser()
    tune_cmd.add_arguments(parser)
    defaults = parser.parse_args([])
    declared = flag_fields(TuneSettings)
    assert {f.name for f in declared} == {"batch_size", "pruner", "prune_startup", "prune_warmup"}
    for f in declared:
        assert getattr(defaults, f.name) == f.default, f.name
    args = parser.parse_args(["--pruner", "none", "--prune-startup", "2", "--prune-warmup", "0", "--batch-size", "3"])
    from vps.commands.common import setting_values

    assert setting_values(args, TuneSettings) == {"pruner": "none", "prune_startup": 2, "prune_warmup": 0,
                                                  "batch_size": 3}
    with pytest.raises(SystemExit):
        parser.parse_args(["--pruner", "mean"])
    assert next(f for f in declared if f.name == "pruner").metadata["choices"] == PRUNERS
    # The declared bound is the settings' own check, and vps tune's before anything is written.
    with pytest.raises(ValueError, match="prune_warmup must be >= 0, got -1"):
        TuneSettings(model="m", data={}, space={}, prune_warmup=-1)
