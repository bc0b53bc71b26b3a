"""The method registry (vps.evaluation.methods): one module's worth of code adds a method to the harness,
``vps eval --methods`` (and its --help), grid files, run.json and the report; rows hold the common fields,
then their method's own."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

import vps
from tests.helpers.tiny_eval import SYSTEM, FakeRefine, settings_for, tiny_tokenizer, write_data
from vps import cli
from vps.commands.eval import method_choices
from vps.evaluation import RunDir, parse_grid, run_evaluation
from vps.evaluation.methods import (
    BUILTIN_MODULES,
    Method,
    MethodSpec,
    RunContext,
    get_method,
    method_names,
    register,
    registered,
    unregister,
)
from vps.evaluation.methods.rows import COMMON_FIELDS, new_row, score
from vps.evaluation.rundir import REPORT_MD
from vps.patching import is_patched
from vps.verify import extract_answer

TOK = tiny_tokenizer()


# -- a toy method, as its own module would define it ----------------------------------------------------------
def _toy_start(ctx: RunContext, spec: MethodSpec) -> Any:
    """Greedy decoding with the run's generate function, recording whether the harness patched the model."""
    def run_batch(batch: Sequence[Any]) -> list[dict[str, Any]]:
        texts, counts = ctx.generate_fn(ctx.model, ctx.tokenizer, [ctx.prompts[it.id] for it in batch],
                                        max_new_tokens=ctx.settings.max_new_tokens, temperature=0.0,
                                        seed=ctx.settings.seed, stop_strings=ctx.settings.stop_strings)
        rows = []
        for it, text, n in zip(batch, texts, counts, strict=True):
            row = new_row(it, spec, ctx.prompts[it.id], len(batch))
            score(row, it, text, extract_answer(text, ctx.settings.extract_mode))
            row.update(tokens=int(n), seconds=0.0, toy={"patched": is_patched(ctx.model), "chars": len(text)})
            rows.append(row)
        return rows

    return run_batch


def _toy_report(entries: Sequence[dict[str, Any]]) -> list[str]:
    return [f"- **Toy**: {', '.join(e['name'] for e in entries)} decode greedily"]


TOY = Method("toy", _toy_start, patched=True, row_fields=("toy",), report_lines=_toy_report)


@pytest.fixture
def toy() -> Iterator[Method]:
    register(TOY)
    try:
        yield TOY
    finally:
        unregister("toy")


# -- the registry -------------------------------------------------------------------------------------------
def test_the_builtin_methods_in_their_order():
    assert BUILTIN_MODULES == ("generation", "refine", "vote")
    assert method_names() == ("base", "vps", "refine-self", "refine-oracle", "maj", "vps-maj")
    assert vps.evaluation.METHODS == method_names()
    assert method_choices() == "base, vps, refine-self, refine-oracle, maj@K, vps-maj@K"
    traits = {m.name: (m.patched, m.oracle, m.votes, m.samples, m.refines, m.row_fields) for m in registered()}
    assert traits == {
        "base": (False, False, False, False, False, ()),
        "vps": (True, False, False, False, False, ("fallbacks",)),
        "refine-self": (True, False, False, True, True, ("refine",)),
        "refine-oracle": (True, True, False, True, True, ("refine",)),
        "maj": (False, False, True, True, False, ("vote",)),
        "vps-maj": (True, False, True, True, False, ("vote",)),
    }


def test_a_name_is_registered_once_and_written_as_the_command_line_can():
    with pytest.raises(ValueError, match="already registered"):
        register(Method("vps", _toy_start))
    for bad in ("", "a@b", "a,b", "a b", " a"):
        with pytest.raises(ValueError, match="method name"):
            Method(bad, _toy_start)
    with pytest.raises(ValueError, match="must name the row field"):
        Method("sampler", _toy_start, samples=True)
    with pytest.raises(KeyError, match="not registered"):
        unregister("nope")
    with pytest.raises(ValueError, match=r"method must be one of \('base', 'vps'"):
        get_method("nope")


def test_rows_hold_the_common_fields_then_their_methods(tmp_path, model, one_thread):
    items, settings = settings_for(write_data(tmp_path / "d.jsonl"), nll=False, refine_k_samples=2)
    specs = [MethodSpec("base", "base"), MethodSpec("vps", "vps"), MethodSpec("refine-self", "refine-self"),
             MethodSpec("maj@2", "maj", votes=2)]
    run_evaluation(model, TOK, items[:2], specs, tmp_path / "run", settings, batch_size=2, progress=False,
                   refine_fn=FakeRefine(), log=lambda _m: None)
    rows = RunDir(tmp_path / "run").read_rows()
    assert {r["config"] for r in rows} == {s.name for s in specs}
    for row in rows:
        assert tuple(row) == COMMON_FIELDS + get_method(row["method"]).row_fields, row["config"]


# -- one module adds a method ---------------------------------------------------------------------------------
def test_a_registered_method_runs_through_the_command_line_harness_and_report(tmp_path, model, monkeypatch,
                                                                              capsys, toy, one_thread):
    assert method_choices().endswith(", toy")
    with pytest.raises(SystemExit):
        cli.main(["eval", "--help"])
    assert "toy" in capsys.readouterr().out.replace("\n", " ")

    monkeypatch.setattr("vps.commands.eval.load", lambda args: (model, TOK))
    out = tmp_path / "out"
    code = cli.main(["eval", "--data", str(write_data(tmp_path / "d.jsonl")), "--methods", "base,toy", "--out",
                     str(out), "--max-new-tokens", "3", "--system", SYSTEM, "--no-progress", "--limit", "3",
                     "--gamma", "0.3"])
    assert code == 0
    rows = RunDir(out).read_rows()
    toy_rows = [r for r in rows if r["method"] == "toy"]
    assert len(toy_rows) == 3 and {r["config"] for r in toy_rows} == {"toy"}
    for row in toy_rows:
        assert tuple(row) == COMMON_FIELDS + ("toy",)
        assert row["toy"]["patched"] is True  # the harness patched the model for a patched method
        assert row["toy"]["chars"] == len(row["output"]) and row["correct"] is not None
    assert not is_patched(model)  # and unpatched it after the toy's configuration
    stored = json.loads((out / "run.json").read_text())["configs"]["toy"]
    assert stored["method"] == "toy" and stored["config"]["gamma"] == 0.3
    report = (out / REPORT_MD).read_text()
    assert "- **Toy**: toy decode greedily" in report
    assert any(line.startswith("| `toy` | toy |") for line in report.splitlines())

    # A grid entry may name it, and a resumed run finds every row done.
    (spec,) = [s for s in parse_grid({"t": {"method": "toy", "gamma": 0.2}}) if s.name == "t"]
    assert spec.patched and spec.config.gamma == 0.2
    assert cli.main(["eval", "--data", str(tmp_path / "d.jsonl"), "--methods", "base,toy", "--out", str(out),
                     "--max-new-tokens", "3", "--system", SYSTEM, "--no-progress", "--limit", "3",
                     "--gamma", "0.3"]) == 0
    assert len(RunDir(out).read_rows()) == 6


def test_an_unregistered_method_is_refused_everywhere(tmp_path, capsys):
    assert "toy" not in method_names()
    with pytest.raises(ValueError, match="method must be one of"):
        MethodSpec("t", "toy")
    with pytest.raises(vps.evaluation.GridError, match="key 'method' must be one of"):
        parse_grid({"t": {"method": "toy"}})
    assert cli.main(["eval", "--data", str(write_data(tmp_path / "d.jsonl")), "--methods", "toy", "--out",
                     str(tmp_path / "o")]) == 2
    assert "--methods: unknown method 'toy'; choose from base, vps," in capsys.readouterr().err
