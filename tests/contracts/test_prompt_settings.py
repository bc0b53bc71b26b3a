"""One check for the prompt settings (``--prompt``, ``--shots``, ``--system``), in one wording.

`PromptSettings` owns the rules: the style is one of `PROMPT_STYLES`, shots are in [1, `MAX_SHOTS`], and the
fewshot style takes no system prompt. Run settings and study settings build one and report its error under the
same field name; ``vps eval``, ``vps ablate`` and ``vps tune`` report it as one line naming the flag, in the
same words, before they read data, load a model or write anything.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vps.commands.common import PROMPT_FLAGS
from vps.evaluation.settings import RunSettings, SettingError
from vps.prompting import MAX_SHOTS, PROMPT_STYLES, PromptFormat, PromptSettingError, PromptSettings
from vps.tuning.settings import TuneSettings

SRC = Path(__file__).resolve().parents[2] / "src"
# Launcher variables would make eval shard and tune refuse to start: the commands run as one plain process.
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

BAD = {  # name -> (PromptSettings arguments, the same as flags)
    "shots 0": ({"style": "fewshot", "shots": 0}, ["--prompt", "fewshot", "--shots", "0"]),
    "shots past the most": ({"style": "fewshot", "shots": MAX_SHOTS + 1},
                            ["--prompt", "fewshot", "--shots", str(MAX_SHOTS + 1)]),
    "fewshot with a system prompt": ({"style": "fewshot", "system": "X"}, ["--prompt", "fewshot", "--system", "X"]),
}


def _refusal(**kwargs: object) -> PromptSettingError:
    with pytest.raises(PromptSettingError) as info:
        PromptSettings(**kwargs)
    return info.value


# -- the rules, once ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, field, message", [
    ({"shots": 0}, "shots", f"shots must be in [1, {MAX_SHOTS}], got 0"),
    ({"style": "fewshot", "shots": MAX_SHOTS + 1}, "shots", f"shots must be in [1, {MAX_SHOTS}], got {MAX_SHOTS + 1}"),
    ({"style": "fewshot", "system": "X"}, "system",
     "system cannot be given with the fewshot prompt, which uses no chat template"),
    ({"style": "chatty"}, "prompt", f"prompt must be one of {PROMPT_STYLES}, got 'chatty'"),
])
def test_prompt_settings_name_the_field_of_the_rule_they_break(kwargs, field, message):
    error = _refusal(**kwargs)
    assert (error.field, str(error)) == (field, message)
    assert error.named(PROMPT_FLAGS[field]) == f"--{message}"  # a flag is the field's name after "--"


def test_the_edges_are_valid_and_a_chat_style_takes_a_system_prompt():
    for settings in (PromptSettings("fewshot", 1), PromptSettings("fewshot", MAX_SHOTS),
                     PromptSettings("boxed", system="Be brief.")):
        assert settings.style in PROMPT_STYLES


@pytest.mark.parametrize("name", BAD)
def test_run_and_study_settings_refuse_with_the_same_field_and_words(name):
    kwargs, _ = BAD[name]
    expected = _refusal(**kwargs)
    fields = {"prompt": kwargs["style"], "shots": kwargs.get("shots", 5), "system": kwargs.get("system")}
    with pytest.raises(SettingError) as run:
        RunSettings(model="m", data={}, **fields)
    assert (run.value.field, str(run.value)) == (expected.field, str(expected))
    with pytest.raises(PromptSettingError) as study:
        TuneSettings(model="m", data={}, space={}, **fields)
    assert (study.value.field, str(study.value)) == (expected.field, str(expected))


def test_prompt_format_words_the_shared_rules_as_prompt_settings_do():
    for kwargs in ({"style": "chatty"}, {"style": "fewshot", "system": "X"}):
        with pytest.raises(PromptSettingError) as info:
            PromptFormat(**kwargs)
        assert str(info.value) == str(_refusal(**kwargs))


# -- the commands, as users run them ------------------------------------------------------------------
def _vps(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), *filter(None, [env.get("PYTHONPATH")])])
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-m", "vps", *argv], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command", ["eval", "ablate", "tune"])
@pytest.mark.parametrize("name", BAD)
def test_every_command_refuses_a_bad_prompt_in_one_line_before_anything(tmp_path, command, name):
    kwargs, flags = BAD[name]
    error = _refusal(**kwargs)
    out = tmp_path / "out"
    # Neither the model nor the data exist: a command that got as far as reading either would say so instead.
    proc = _vps(command, "--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "no-data.jsonl"),
                "--out", str(out), *flags)
    assert proc.returncode != 0, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"vps {command}: error: {error.named(PROMPT_FLAGS[error.field])}"]
    assert proc.stdout == ""
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []
