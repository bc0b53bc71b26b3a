"""Stored rows are checked on read: a hand-edited row is named by its file and line, never a traceback."""

from __future__ import annotations

import json

import pytest

from tests.helpers.tiny_eval import fake_generate, settings_for, tiny_tokenizer, write_data
from vps import cli
from vps.evaluation import MethodSpec, RunDir, run_evaluation

TOK = tiny_tokenizer()
SPECS = [MethodSpec("base", "base"), MethodSpec("vps", "vps")]


@pytest.fixture
def run_dir(tmp_path, model):
    items, settings = settings_for(write_data(tmp_path / "d.jsonl"), nll=False)
    out = tmp_path / "run"
    run_evaluation(model, TOK, items, SPECS, out, settings, batch_size=2, progress=False,
                   generate_fn=fake_generate({"base": {0}, "vps": {0, 1}}), log=lambda _m: None)
    return out


def _edit_row(out, line, **changes):
    rows = (out / "results.jsonl").read_text().splitlines()
    row = json.loads(rows[line - 1])
    for key, value in changes.items():
        if value is KeyError:
            row.pop(key)
        else:
            row[key] = value
    rows[line - 1] = json.dumps(row)
    (out / "results.jsonl").write_text("\n".join(rows) + "\n")


@pytest.mark.parametrize("changes, needle", [
    ({"nll": "low"}, "field 'nll' must be a number or null, got 'low'"),
    ({"seconds": [1]}, "field 'seconds' must be a number or null"),
    ({"tokens": True}, "field 'tokens' must be a number or null, got True"),
    ({"config": KeyError}, "field 'config' must be non-empty text, got None"),
    ({"output": 7}, "field 'output' must be text or null, got 7"),
    ({"gold_text": "  "}, "field 'gold_text' is blank"),
    ({"correct": "yes"}, "field 'correct' must be true, false or null, got 'yes'"),
])
@pytest.mark.parametrize("command", ["report", "rescore"])
def test_a_bad_row_is_named_by_file_and_line(run_dir, capsys, changes, needle, command):
    _edit_row(run_dir, 3, **changes)
    argv = (["eval", "--report-only", "--out", str(run_dir)] if command == "report"
            else ["rescore", str(run_dir), "--extract", "last", "--out", str(run_dir.parent / "re")])
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{run_dir / 'results.jsonl'}:3: {needle}" in err[0], err


def test_rows_the_run_does_not_hold_are_refused(run_dir, capsys):
    rows = RunDir(run_dir).read_rows()
    ghost = {**rows[0], "config": "ghost"}
    extra = {**rows[0], "id": "not-in-the-data"}
    for bad, needle in ((ghost, "names configuration 'ghost', which"), (extra, "6 rows for configuration 'base', but "
                                                                                "the run has 5 items")):
        (run_dir / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*rows, bad]))
        assert cli.main(["eval", "--report-only", "--out", str(run_dir)]) == 2
        assert needle in capsys.readouterr().err
