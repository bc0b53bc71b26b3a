"""Every JSON file and stream vps writes is strict JSON: a number that is not finite is null, never NaN.

Python's json module writes and reads ``NaN`` / ``Infinity``; strict readers (JavaScript, jq, most
other languages) reject them. Every written file is parsed here with a parser that refuses them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers.tiny_eval import (
    SPECS,
    Clock,
    FakeRefine,
    FakeRefineResult,
    fake_generate,
    settings_for,
    tiny_tokenizer,
    write_data,
)
from vps import cli
from vps._io import dumps_strict, finite_json
from vps.evaluation import MethodSpec, RunDir, rescore_run, run_evaluation, write_report
from vps.evaluation import report as report_mod
from vps.evaluation.summary import summarize_run
from vps.verify import extract_answer

TOK = tiny_tokenizer()
NAN, INF = float("nan"), float("inf")

pytestmark = pytest.mark.usefixtures("one_thread")


def strict_loads(text: str) -> object:
    def refuse(name: str) -> None:
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def strict_lines(path: Path) -> list[dict]:
    return [strict_loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@dataclasses.dataclass
class Point:
    x: float
    label: str


# -- the conversion ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name, value, expected", [
    ("nan", NAN, None),
    ("inf", INF, None),
    ("-inf", -INF, None),
    ("finite float", 1.5, 1.5),
    ("int", 3, 3),
    ("bool", True, True),
    ("none", None, None),
    ("text that says NaN", "NaN", "NaN"),
    ("nested", {"a": [1, NAN, {"b": INF, "c": 2.0}]}, {"a": [1, None, {"b": None, "c": 2.0}]}),
    ("tuple", (NAN, 2), [None, 2]),
    ("tensor", torch.tensor([1.0, NAN]), [1.0, None]),
    ("tensor scalar", torch.tensor(INF), None),
    ("numpy float", np.float64("nan"), None),
    ("numpy array", np.array([0.5, np.inf]), [0.5, None]),
    ("dataclass", Point(NAN, "p"), {"x": None, "label": "p"}),
    ("set", {1}, [1]),
])
def test_finite_json(name, value, expected):
    assert finite_json(value) == expected, name
    assert strict_loads(dumps_strict({"v": value})) == {"v": expected}, name


def test_dumps_strict_never_writes_nan():
    with pytest.raises(ValueError):  # what it guards against: json.dumps would write NaN here
        json.dumps(NAN, allow_nan=False)
    assert dumps_strict([NAN, {"total": NAN}]) == '[null, {"total": null}]'


# -- the files of a run ------------------------------------------------------------------------------
class NaNRefine(FakeRefine):
    """FakeRefine whose traces hold a loss without evidence (total NaN) and an infinite component."""

    def __call__(self, *args, **kwargs):
        out = []
        for r in super().__call__(*args, **kwargs):
            trace = [{"iter": 0, "text": r.best_text, "loss": {"total": NAN, "components": {"numeric": INF}},
                      "gains": torch.tensor([1.0, NAN])}]
            out.append(FakeRefineResult(oracle=r.oracle, mode=r.mode, best_text=r.best_text,
                                        best_answer=extract_answer(r.best_text), trace=trace))
        return out


@pytest.fixture
def refine_run(tmp_path, model, monkeypatch):
    items, settings = settings_for(write_data(tmp_path / "d.jsonl"), nll=False)
    out = tmp_path / "out"
    specs = [*SPECS, MethodSpec("refine-self", "refine-self"), MethodSpec("refine-oracle", "refine-oracle")]
    # a statistic that is not finite, as a summary can hold one (e.g. a mean over no data); patched where
    # write_report looks it up
    monkeypatch.setattr(report_mod, "summarize_run", lambda s, r: {**summarize_run(s, r), "probe": NAN})
    run_evaluation(model, TOK, items[:3], specs, out, settings, batch_size=2, progress=False,
                   generate_fn=fake_generate({"base": {0}, "vps": {1}}), refine_fn=NaNRefine(), clock=Clock(),
                   log=lambda _m: None)
    write_report(out)
    return out


@pytest.mark.parametrize("name, file, check", [
    ("rows", "results.jsonl",
     lambda parsed: [r["refine"]["trace"][0]["loss"] for r in parsed if r["method"].startswith("refine")]
     == [{"total": None, "components": {"numeric": None}}] * 6),
    ("rows: tensors too", "results.jsonl",
     lambda parsed: {str(r["refine"]["trace"][0]["gains"]) for r in parsed if "refine" in r} == {"[1.0, None]"}),
    ("run.json", "run.json", lambda parsed: parsed["configs"]["refine-oracle"]["oracle"] is True),
    ("summary.json", "summary.json", lambda parsed: parsed["probe"] is None),
])
def test_every_file_of_a_run_is_strict_json(refine_run, name, file, check):
    path = refine_run / file
    parsed = strict_lines(path) if file.endswith(".jsonl") else strict_loads(path.read_text(encoding="utf-8"))
    assert check(parsed), name
    if file == "results.jsonl":  # the rows read back: null is "no value", the run resumes on them
        assert len(RunDir(refine_run).read_rows()) == 12


def test_a_summary_of_rows_without_finite_seconds_is_strict(tmp_path, model):
    # rows written before this fix could hold NaN (Python's json reads it); the summary of them is strict
    items, settings = settings_for(write_data(tmp_path / "d.jsonl"), nll=False)
    out = tmp_path / "out"
    run_evaluation(model, TOK, items[:2], SPECS, out, settings, progress=False,
                   generate_fn=fake_generate({"base": {0}, "vps": {1}}), clock=Clock(), log=lambda _m: None)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    for r in rows:
        r["seconds"] = NAN
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_report(out)
    summary = strict_loads((out / "summary.json").read_text())
    assert {e["name"]: e["seconds_mean"] for e in summary["configs"]} == {"base": None, "vps": None}


def test_rescored_files_are_strict(tmp_path, model):
    items, settings = settings_for(write_data(tmp_path / "d.jsonl"), nll=False)
    src = tmp_path / "src"
    run_evaluation(model, TOK, items[:2], SPECS, src, settings, progress=False,
                   generate_fn=fake_generate({"base": {0}, "vps": {1}}), clock=Clock(), log=lambda _m: None)
    rows = [json.loads(line) for line in (src / "results.jsonl").read_text().splitlines()]
    for r in rows:  # as an older run may hold
        r["nll"] = NAN
    (src / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "rescored"
    rescore_run(src, out, "last")
    assert [r["nll"] for r in strict_lines(out / "results.jsonl")] == [None] * 4
    for name in ("run.json", "summary.json"):
        strict_loads((out / name).read_text())


# -- vps refine --json ---------------------------------------------------------------------------------
@dataclasses.dataclass
class _Result:
    oracle: bool = False

    def to_dict(self) -> dict:
        return {"oracle": self.oracle, "best_text": "#### 5",
                "trace": [{"iter": 0, "loss": {"total": NAN, "components": {"numeric": NAN}},
                           "policy": {"sigma": INF}, "entropy": 0.5}]}


def test_refine_json_is_strict(model, monkeypatch, capsys):
    import vps.commands.refine as refine_cmd

    monkeypatch.setattr(refine_cmd, "load", lambda args: (model, TOK))
    # the command imports these when it runs (so that its parser stays light): patch them at their source
    monkeypatch.setattr("vps.patching.patch", lambda model, cfg: model)
    monkeypatch.setattr("vps.refinement.refine", lambda *a, **k: _Result())
    assert cli.main(["refine", "What is 2 + 3?", "--json"]) == 0
    parsed = strict_loads(capsys.readouterr().out)
    row = parsed["trace"][0]
    assert row["loss"] == {"total": None, "components": {"numeric": None}} and row["policy"]["sigma"] is None
    assert row["entropy"] == 0.5 and not math.isnan(row["entropy"])
