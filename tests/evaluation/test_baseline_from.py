"""``vps eval --baseline-from RUN_DIR``: base rows copied from an earlier run, only where they would be the same."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.tiny_eval import QUESTIONS, tiny_model, tiny_tokenizer, write_data
from vps.cli import main
from vps.evaluation import RunDir
from vps.evaluation.baseline import IMPORTED_FROM


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok)


@pytest.fixture
def cli(model, tok, monkeypatch):
    """``vps eval`` in this process, on the tiny model (real generation), returning its exit code."""
    loads = []

    def load(args):
        loads.append(args.out)
        return model, tok

    monkeypatch.setattr("vps.commands.eval.load", load)

    def run(*flags: str) -> int:
        return main(["eval", "--max-new-tokens", "6", "--batch-size", "2", "--no-progress", "--threads", "1", *flags])

    run.loads = loads  # type: ignore[attr-defined]
    return run


# At the seed defaults this 2-layer model's greedy text does not change; at these settings it does.
STRONG = ("--gamma", "1", "--tau", "50", "--rank", "4")


def _rows(out: Path, config: str) -> dict[str, dict]:
    return {r["id"]: r for r in RunDir(out).read_rows() if r["config"] == config}


def test_base_rows_come_from_the_earlier_run_and_equal_fresh_ones(cli, tmp_path, model, tok):
    data = write_data(tmp_path / "d.jsonl")
    first = tmp_path / "all"
    assert cli("--data", str(data), "--methods", "base,vps", *STRONG, "--out", str(first)) == 0
    base_all, vps_all = _rows(first, "base"), _rows(first, "vps")
    assert any(base_all[i]["output"] != vps_all[i]["output"] for i in base_all)  # VPS changes this model's text

    # A subset of the same data, a new method beside base: base is copied, vps computed.
    out = tmp_path / "subset"
    assert cli("--data", str(data), "--limit", "3", "--methods", "base,vps", "--baseline-from", str(first),
               "--out", str(out), *STRONG) == 0
    copied = _rows(out, "base")
    assert len(copied) == 3 and all(r[IMPORTED_FROM] == str(first) for r in copied.values())
    for i, row in copied.items():
        assert {k: v for k, v in row.items() if k != IMPORTED_FROM} == base_all[i]
    assert all(IMPORTED_FROM not in r for r in _rows(out, "vps").values())
    stored = json.loads((out / "run.json").read_text())
    assert stored["imported"] == {"base": {"from": str(first), "rows": 3}}
    report = (out / "report.md").read_text()
    assert f"**Imported rows**: 3 `base` row(s) copied from `{first}`" in report
    summary = json.loads((out / "summary.json").read_text())
    assert summary["imported"]["base"]["rows"] == 3

    # The copies are what this run would have computed: a fresh run of the same items agrees.
    fresh = tmp_path / "fresh"
    assert cli("--data", str(data), "--limit", "3", "--methods", "base", "--out", str(fresh)) == 0
    assert {i: r["output"] for i, r in _rows(fresh, "base").items()} == {i: r["output"] for i, r in copied.items()}

    # Resuming imports nothing twice.
    assert cli("--data", str(data), "--limit", "3", "--methods", "base,vps", "--baseline-from", str(first),
               "--out", str(out), *STRONG) == 0
    assert len(RunDir(out).read_rows()) == 6
    assert json.loads((out / "run.json").read_text())["imported"]["base"]["rows"] == 3


def test_items_the_source_lacks_are_computed(cli, tmp_path):
    data = write_data(tmp_path / "d.jsonl")
    first = tmp_path / "two"
    assert cli("--data", str(data), "--limit", "2", "--methods", "base", "--out", str(first)) == 0
    out = tmp_path / "all"
    assert cli("--data", str(data), "--methods", "base", "--baseline-from", str(first), "--out", str(out)) == 0
    rows = _rows(out, "base")
    assert len(rows) == len(QUESTIONS) and sum(IMPORTED_FROM in r for r in rows.values()) == 2


@pytest.mark.parametrize("flags, needle", [
    (["--max-new-tokens", "5"], "max_new_tokens: there 6, here 5"),
    (["--system", "Think."], "system: there"),
    (["--dtype", "bfloat16"], "dtype: there 'float32', here 'bfloat16'"),
    (["--nll"], "nll: there False, here True"),
])
def test_other_settings_are_refused_naming_the_field_before_anything_is_written(cli, tmp_path, flags, needle, capsys):
    data = write_data(tmp_path / "d.jsonl")
    first = tmp_path / "first"
    assert cli("--data", str(data), "--limit", "2", "--methods", "base", "--out", str(first)) == 0
    out = tmp_path / "second"
    capsys.readouterr()
    loads = len(cli.loads)
    assert cli("--data", str(data), "--limit", "2", "--methods", "base,vps", "--baseline-from", str(first),
               "--out", str(out), *flags) != 0
    err = capsys.readouterr().err
    assert "--baseline-from" in err and needle in err, err
    assert not out.exists() and len(cli.loads) == loads  # refused before the model loaded or a file was written


def test_sources_that_cannot_supply_a_baseline(cli, tmp_path, capsys):
    data = write_data(tmp_path / "d.jsonl")
    no_base = tmp_path / "vps-only"
    assert cli("--data", str(data), "--limit", "1", "--methods", "vps", "--out", str(no_base)) == 0
    cases = [
        (["--baseline-from", str(tmp_path / "missing")], "no run.json there"),
        (["--baseline-from", str(no_base)], "has no `base` configuration"),
        (["--baseline-from", str(no_base), "--methods", "vps"], "--methods has no base"),
    ]
    for flags, needle in cases:
        capsys.readouterr()
        assert cli("--data", str(data), "--limit", "1", "--out", str(tmp_path / "x"), *flags) != 0
        assert needle in capsys.readouterr().err
        assert not (tmp_path / "x").exists()


def test_a_row_for_another_prompt_is_refused_naming_the_item(cli, tmp_path, capsys):
    data = write_data(tmp_path / "d.jsonl")
    first = tmp_path / "first"
    assert cli("--data", str(data), "--limit", "2", "--methods", "base", "--out", str(first)) == 0
    rows = RunDir(first).read_rows()
    rows[0]["prompt"] = rows[0]["prompt"].replace("toys", "dolls") + " "
    (first / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    capsys.readouterr()
    assert cli("--data", str(data), "--limit", "2", "--methods", "base", "--baseline-from", str(first),
               "--out", str(tmp_path / "second")) != 0
    assert f"item {rows[0]['id']!r} has another prompt there than here" in capsys.readouterr().err
