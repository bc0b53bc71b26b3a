"""`vps._io`: atomic writes, reading a settings file, and the one resume comparison of eval runs and tune studies.

The directory lock has its own file (test_io_lock.py, beside this one), strict JSON too
(tests/contracts/test_strict_json.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from vps import _io
from vps._io import RunMismatchError, check_resume, read_json_object, write_atomic
from vps.evaluation import rundir
from vps.evaluation.rundir import RunDir, merge_settings

DATA = Path(__file__).resolve().parents[1] / "data"


# -- atomic writes ---------------------------------------------------------------------------------------
def test_write_atomic_replaces_the_file_and_leaves_nothing_beside_it(tmp_path):
    path = tmp_path / "f.json"
    write_atomic(path, "one\n")
    write_atomic(path, "two\n")
    assert path.read_text() == "two\n" and sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


def test_write_atomic_interrupted_before_the_move_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "f.json"
    write_atomic(path, "old\n")

    def fail(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, "new\n")
    assert path.read_text() == "old\n"  # a reader never sees a part of the new file
    assert (tmp_path / "f.json.tmp").read_text() == "new\n"


# -- settings files --------------------------------------------------------------------------------------
def test_read_json_object_names_the_file_when_it_is_not_an_object(tmp_path):
    path = tmp_path / "run.json"
    path.write_text('{"a": 1}')
    assert read_json_object(path) == {"a": 1}
    path.write_text('{"a": ')
    with pytest.raises(RunMismatchError, match=rf"{path} is not valid JSON .*move the directory aside"):
        read_json_object(path)
    path.write_text("[1]")
    with pytest.raises(RunMismatchError, match=rf"{path} must hold a JSON object"):
        read_json_object(path)
    path.unlink()
    path.mkdir()
    with pytest.raises(RunMismatchError, match=rf"{path} is a directory, not a file"):
        read_json_object(path)


# -- the resume comparison -------------------------------------------------------------------------------
STORED = {"format": 1, "model": "m", "data": {"path": "a.jsonl", "seed": 0, "sample": None}, "batch_size": 8,
          "stop": ["x"]}


def test_check_resume_accepts_the_same_settings_and_names_every_difference():
    check_resume(STORED, json.loads(json.dumps(STORED)), "out", "out/run.json")
    new = {**STORED, "data": {**STORED["data"], "seed": 1}, "batch_size": 4, "stop": ["y"], "extra": True}
    with pytest.raises(RunMismatchError) as err:
        check_resume(STORED, new, "out", "out/run.json", kind="study", problems=["configuration 'v' changed (x)"])
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("out holds a study with different settings; refusing to mix results. Differences: ")
    for part in ("batch_size: stored 8, now 4", "data.seed: stored 0, now 1", "extra: stored None, now True",
                 "stop: stored ['x'], now ['y']", "configuration 'v' changed (x)", "(see out/run.json)"):
        assert part in message
    assert "data.path" not in message and "model" not in message  # only what differs


def test_check_resume_skips_a_key_and_everything_below_it():
    new = {**STORED, "format": 2, "data": {"path": "b.jsonl", "seed": 1}}
    check_resume(STORED, new, "out", "out/run.json", skip={"format", "data"})
    with pytest.raises(RunMismatchError, match=r"data.seed: stored 0, now 1") as err:
        check_resume(STORED, new, "out", "out/run.json", skip={"format", "data.path"})
    assert "data.path" not in str(err.value) and "format" not in str(err.value)


def _run_settings(**changes):
    settings = {"format": rundir.RUN_FORMAT, "vps_version": "0", "model": "m", "generate": True, "nll": False,
                "max_new_tokens": 4, "prompt": "tutor", "data": {"path": "d.jsonl", "seed": 0},
                "configs": {"base": {"method": "base", "oracle": False, "config": None}}, "baseline": "base"}
    return {**settings, **changes}


def test_eval_runs_resume_through_the_one_comparison(tmp_path, monkeypatch):
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs.get("kind", "run"))
        return check_resume(*args, **kwargs)

    monkeypatch.setattr(rundir, "check_resume", spy)
    run = RunDir(tmp_path / "out")
    run.prepare(_run_settings())
    assert run.prepare(_run_settings())[0] == _run_settings()  # unchanged: accepted
    with pytest.raises(RunMismatchError, match=r"max_new_tokens: stored 4, now 9") as err:
        run.prepare(_run_settings(max_new_tokens=9))
    assert f"see {run.path}/run.json" in str(err.value)
    assert calls == ["run", "run"]
    assert rundir.check_resume is spy and _io.check_resume is check_resume


def test_tune_studies_resume_through_the_one_comparison():
    from vps.tuning import study

    assert study.check_resume is check_resume  # the study's settings are compared by vps._io's, not a copy


# -- run.json format 1 (runs made before the retired settings went) ------------------------------------
# Copies of the run.json files of two runs started before run.json format 2: both recorded the four retired
# settings with the values every run now uses.
FORMAT1_RUNS = ["format1-vote-run.json", "format1-nll-run.json"]


def _today(stored: dict) -> dict:
    """What this version writes for the settings of the format-1 ``stored``."""
    new = {k: v for k, v in stored.items() if k not in rundir.FORMAT1_MODES and k != "imported"}
    return {**new, "format": rundir.RUN_FORMAT}


@pytest.mark.parametrize("name", FORMAT1_RUNS)
def test_a_format_1_run_json_with_todays_ways_resumes(name):
    stored = json.loads((DATA / name).read_text())
    assert stored["format"] == 1 and set(rundir.FORMAT1_MODES) <= set(stored)
    assert merge_settings(stored, _today(stored), "out") == stored  # kept as it was written


@pytest.mark.parametrize("name", FORMAT1_RUNS)
@pytest.mark.parametrize(("key", "value"), [("batch_order", "input"), ("nll_scoring", "recompute"),
                                            ("refine_batching", "item"), ("refine_sampling", "global"),
                                            ("batch_order", None)])
def test_a_format_1_run_json_with_a_retired_way_is_refused_where_it_applies(tmp_path, name, key, value):
    stored = json.loads((DATA / name).read_text())
    if value is None:
        del stored[key]
    else:
        stored[key] = value
    run = RunDir(tmp_path / "out")
    run.path.mkdir()
    run.run_file.write_text(json.dumps(stored, indent=2) + "\n")
    methods = {spec["method"] for spec in stored["configs"].values()}
    applies = {"batch_order": True, "nll_scoring": stored["nll"], "refine_batching": "refine-self" in methods,
               "refine_sampling": bool(methods & {"refine-self", "maj", "vps-maj"})}[key]
    if not applies:
        assert run.prepare(_today(stored))[0] == stored
        return
    with pytest.raises(RunMismatchError) as err:
        run.prepare(_today(stored))
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{run.path}/run.json (format 1) records ")
    assert (f"{key} {value!r}" if value is not None else f"no {key}") in message
    assert "cannot be resumed (its results still report)" in message
    assert json.loads(run.run_file.read_text()) == stored  # nothing written
