"""One set of override rules for every way into a `VPSConfig` (issue #32 item 1).

The CLI flags, ablation grids, bench specs, the tune space and its trials, and lm-eval's ``vps_config``
all go through `VPSConfig.from_overrides`: the same overrides give the same config (a larger rank widens
topk everywhere), and a bad value gives the same `ConfigError` wording, after the name of its source.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util

import pytest

from vps.bench.presets import make_config, parse_config_spec, resolve_configs
from vps.commands.common import add_config_arguments, add_prompt_arguments, config_from_args, prompt_from_args
from vps.config import ConfigError, VPSConfig, as_config, cli_fields
from vps.evaluation.ablation import parse_grid
from vps.evaluation.settings import RunSettings
from vps.prompting import DEFAULT_SHOTS, PromptSettings
from vps.tuning.placement import Placement, trial_config
from vps.tuning.settings import TuneSettings
from vps.tuning.space import parse_space

# A placement with no layer split: trial_config then sets neither target_modules nor layers.
_ANYWHERE = Placement((), (), 0)


def _cli(*argv: str) -> VPSConfig:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return config_from_args(parser.parse_args(list(argv)))


# lm-eval is an optional extra: its path is compared where it is installed.
HAVE_LM_EVAL = importlib.util.find_spec("lm_eval") is not None


def _every_path(field: str, value: object) -> dict[str, VPSConfig | None]:
    return {
        "with_overrides": VPSConfig().with_overrides(**{field: value}),
        "from_overrides": VPSConfig.from_overrides({field: value}),
        "grid": parse_grid({"g": {field: value}})[0].config,
        "cli": _cli(f"--{field}", str(value)),
        "bench": make_config(parse_config_spec(f"hybrid:{field}={value}")[1]),
        "trial": trial_config({field: value}, _ANYWHERE).config,
        "patch": as_config(**{field: value}),  # what vps.patch(model, **overrides) applies
    } | ({"lm-eval": _lm_eval_config({field: value})} if HAVE_LM_EVAL else {})


def _lm_eval_config(overrides: dict[str, object]) -> VPSConfig | None:
    from vps.lmeval.model import resolve_config

    return resolve_config(overrides)


@pytest.mark.parametrize("field, value", [("rank", 64), ("rank", 4), ("gamma", 0.25), ("topk", 8)])
def test_every_entry_point_builds_the_same_config(field, value):
    built = _every_path(field, value)
    assert all(cfg == built["with_overrides"] for cfg in built.values()), built


def test_a_larger_rank_widens_topk_everywhere_grids_included():
    built = _every_path("rank", 64)
    assert built["grid"] == VPSConfig(rank=64, topk=64)  # a grid refused {rank: 64} before
    # An explicit topk is kept, and refused below the rank, wherever it comes from.
    with pytest.raises(ConfigError, match="topk must be >= rank"):
        parse_grid({"g": {"rank": 64, "topk": 8}})
    with pytest.raises(ConfigError, match="topk must be >= rank"):
        _cli("--rank", "64", "--topk", "8")


def _error(call) -> str:
    with pytest.raises(ConfigError) as info:
        call()
    return str(info.value)


def test_a_bad_value_reads_the_same_after_its_source():
    wording = "rank must be an int >= 1, got 0"
    messages = {
        "--rank 0": _error(lambda: _cli("--rank", "0")),
        "grid: configuration 'g'": _error(lambda: parse_grid({"g": {"rank": 0}})),
        "bench config 'sk:rank=0'": _error(lambda: resolve_configs("sk:rank=0")),
        "space: key 'rank'": _error(lambda: parse_space({"rank": 0, "gamma": [0.1, 0.2]})),
        "spec": _error(lambda: VPSConfig.from_overrides({"rank": 0}, source="spec")),
    }
    if HAVE_LM_EVAL:
        messages["vps_config"] = _error(lambda: _lm_eval_config({"rank": 0}))
    for source, message in messages.items():
        assert message == f"{source}: {wording}"
    assert _error(lambda: VPSConfig().with_overrides(rank=0)) == wording  # the Python API names no source


def test_an_unknown_field_names_its_source_and_the_nearest_field():
    message = _error(lambda: VPSConfig.from_overrides({"ranks": 4}, source="x.yaml"))
    assert message == "x.yaml: unknown VPSConfig field 'ranks' (did you mean 'rank'?)"
    assert "bench config 'sk:ranks=4'" in _error(lambda: resolve_configs("sk:ranks=4"))


def test_negative_gamma_is_damping_only_where_allowed():
    damped = VPSConfig.from_overrides({"gamma": -0.3}, allow_damping=True)
    assert damped == VPSConfig(gamma=0.3, damping=True)
    assert trial_config({"gamma": -0.3}, _ANYWHERE).config == damped
    for call in (lambda: VPSConfig.from_overrides({"gamma": -0.3}), lambda: parse_grid({"g": {"gamma": -0.3}}),
                 lambda: _cli("--gamma", "-0.3"), lambda: resolve_configs("sk:gamma=-0.3")):
        assert "gamma must be a finite number in [0.0, 1.0]" in _error(call)


def test_cli_flags_come_from_the_field_metadata():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    actions = {a.option_strings[0]: a for a in parser._actions if a.option_strings}
    for f in cli_fields():
        action = actions[f.metadata["flag"]]
        if "help" in f.metadata:
            assert action.help == f.metadata["help"].format(default=f.default)
        assert tuple(action.choices or ()) == tuple(f.metadata.get("choices", ()))
    assert "default 2" in actions["--rank"].help and actions["--order"].type is int
    # --fixed sets both adaptive fields, --no-qk-coupling clears coupling.
    assert _cli("--fixed", "--no-qk-coupling") == VPSConfig(adaptive_rank=False, adaptive_gamma=False,
                                                            qk_coupling=False)


def test_eval_and_tune_share_one_prompt_declaration():
    parser = argparse.ArgumentParser()
    add_prompt_arguments(parser)
    assert prompt_from_args(parser.parse_args([])) == PromptSettings() == PromptSettings("tutor", DEFAULT_SHOTS)
    assert DEFAULT_SHOTS == 5
    defaults = {f.name: f.default for f in dataclasses.fields(RunSettings)}
    assert defaults["shots"] == TuneSettings.shots == DEFAULT_SHOTS
    assert prompt_from_args(parser.parse_args(["--prompt", "fewshot", "--shots", "3"])) == PromptSettings("fewshot", 3)
