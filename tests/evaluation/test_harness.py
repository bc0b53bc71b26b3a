"""The evaluation harness on a tiny Llama: resume, oracle labels, malformed data, NLL honesty, grids, CLI."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch

import vps
from tests.helpers.tiny_eval import (
    SPECS,
    SYSTEM,
    Clock,
    FakeRefine,
    FakeRefineResult,
    fake_generate,
    settings_for,
    stop_inside,
    tiny_tokenizer,
    write_data,
)
from vps import cli
from vps.evaluation import (
    GridError,
    MethodSpec,
    RunDir,
    RunMismatchError,
    load_grid,
    parse_grid,
    run_evaluation,
    solution_nll,
    write_report,
)
from vps.evaluation.methods import refine as refine_mod
from vps.evaluation.rundir import REPORT_MD, SUMMARY_JSON
from vps.kv_cache import cache_argument, output_cache
from vps.prompting import chat_prompt
from vps.verify import extract_answer

TOK = tiny_tokenizer()


pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(out: Path) -> list[dict]:
    return sorted(RunDir(out).read_rows(), key=lambda r: (r["config"], r["index"]))


# -- resume ------------------------------------------------------------------------------------------
def test_resume_after_interruption_gives_the_same_report(tmp_path, model):
    data = write_data(tmp_path / "d.jsonl")
    items, settings = settings_for(data)
    specs = [*SPECS, MethodSpec("refine-oracle", "refine-oracle")]
    kw = dict(batch_size=2, progress=False, refine_fn=FakeRefine(), log=lambda _m: None)

    full = tmp_path / "full"
    run_evaluation(model, TOK, items, specs, full, settings, clock=Clock(), **kw)
    write_report(full)

    part = tmp_path / "part"
    seen = []

    def interrupt(name, rows):
        seen.append(name)
        if len(seen) == 4:  # base's 3 batches, then vps's first: stop in the middle of vps
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_evaluation(model, TOK, items, specs, part, settings, clock=Clock(), on_batch=interrupt, **kw)
    assert not vps.is_patched(model)  # the interrupted configuration was unpatched on the way out
    assert len(RunDir(part).read_rows()) == 7  # 5 base rows + the 2 of vps's first batch: nothing else lost
    # A kill in the middle of a write leaves half a line behind.
    with (part / "results.jsonl").open("a") as fh:
        fh.write('{"id": "d-4", "config": "vps", "outp')
    with pytest.warns(UserWarning, match="unparsable final line"):
        written = run_evaluation(model, TOK, items, specs, part, settings, clock=Clock(), **kw)
    assert written == {"base": 0, "vps": 3, "refine-oracle": 5}
    write_report(part)

    assert _rows(part) == _rows(full)
    assert (part / REPORT_MD).read_text() == (full / REPORT_MD).read_text()
    assert json.loads((part / SUMMARY_JSON).read_text()) == json.loads((full / SUMMARY_JSON).read_text())
    # a second resume has nothing left to do
    assert run_evaluation(model, TOK, items, specs, part, settings, **kw) == {"base": 0, "vps": 0,
                                                                               "refine-oracle": 0}


def test_rows_have_the_schema_and_are_scored(tmp_path, model):
    data = write_data(tmp_path / "d.jsonl")
    items, settings = settings_for(data)
    out = tmp_path / "out"
    gen = fake_generate({"base": {0, 1}, "vps": {1, 2, 3}})
    run_evaluation(model, TOK, items, SPECS, out, settings, batch_size=3, progress=False, generate_fn=gen,
                   log=lambda _m: None)
    rows = _rows(out)
    assert len(rows) == 10
    keys = {"id", "index", "config", "method", "oracle", "prompt", "output", "pred", "pred_number", "pred_source",
            "gold", "gold_text", "correct", "tokens", "seconds", "nll", "nll_tokens", "nll_seconds", "batch_size"}
    for r in rows:
        assert keys <= set(r)
        assert r["oracle"] is False
        assert r["prompt"].startswith(f"system: {SYSTEM}\nuser: ")
        assert r["nll"] > 0 and r["nll_tokens"] > 0 and r["seconds"] >= 0
    base = [r["correct"] for r in rows if r["config"] == "base"]
    assert base == [True, True, False, False, False]
    assert [r["pred_number"] for r in rows if r["config"] == "vps"] == [999, 12, 6, 6, 999]
    assert rows[0]["gold"] == 7.0 and rows[0]["gold_text"] == "7"


def _recording_generate(seen: list[list[int]]):
    gen = fake_generate({"base": {0}, "vps": {1}})

    def generate(model, tokenizer, prompts, *args, **kwargs):
        seen.append([len(TOK(p, add_special_tokens=False)["input_ids"]) for p in prompts])
        return gen(model, tokenizer, prompts, *args, **kwargs)

    return generate


def _without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("seconds", "nll_seconds")} for r in rows]


def test_batches_hold_items_of_similar_length_and_their_composition_changes_no_result(tmp_path, model):
    data = write_data(tmp_path / "d.jsonl")
    items, settings = settings_for(data, nll=False)
    kw = dict(progress=False, log=lambda _m: None)
    seen2: list[list[int]] = []
    seen3: list[list[int]] = []
    run_evaluation(model, TOK, items, SPECS, tmp_path / "b2", settings, batch_size=2,
                   generate_fn=_recording_generate(seen2), **kw)
    run_evaluation(model, TOK, items, SPECS, tmp_path / "b3", settings, batch_size=3,
                   generate_fn=_recording_generate(seen3), **kw)
    in_order = [len(TOK(chat_prompt(TOK, it.question, system=SYSTEM), add_special_tokens=False)
                    ["input_ids"]) for it in items]
    assert in_order != sorted(in_order, reverse=True)  # the data's order is not the batches'
    assert [n for batch in seen2[:3] for n in batch] == sorted(in_order, reverse=True)  # base's batches
    assert [n for batch in seen3[:2] for n in batch] == sorted(in_order, reverse=True)

    def same(out):
        return [{k: v for k, v in r.items() if k != "batch_size"} for r in _without_timing(_rows(out))]

    assert same(tmp_path / "b2") == same(tmp_path / "b3")


# -- run.json format 1 ------------------------------------------------------------------------------------
# The four settings of how a run computed that run.json format 1 recorded, with the values every run now uses,
# in the place format 1 wrote them (after "command").
FORMAT1_DEFAULTS = {"batch_order": "length", "nll_scoring": "cached", "refine_batching": "batch",
                    "refine_sampling": "streams"}


def _untimed(value):
    """``value`` without the wall times it holds anywhere (the vote methods' samples time themselves)."""
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if k not in ("seconds", "nll_seconds")}
    return [_untimed(v) for v in value] if isinstance(value, list) else value


def _as_format1(out: Path, **modes: str | None) -> dict:
    """Rewrite ``out``'s run.json as format 1 wrote it: the four settings after "command", with the current
    values or ``modes`` (None: the key missing, as in a run written before the setting existed)."""
    stored = json.loads((out / "run.json").read_text())
    assert stored["format"] == 2 and not set(FORMAT1_DEFAULTS) & set(stored)
    old: dict = {}
    for key, value in stored.items():
        old[key] = value
        if key == "command":
            old.update({k: v for k, v in {**FORMAT1_DEFAULTS, **modes}.items() if v is not None})
    old["format"] = 1
    (out / "run.json").write_text(json.dumps(old, indent=2) + "\n")
    return old


def test_a_partial_run_of_format_1_resumes_with_the_rows_of_an_uninterrupted_run(tmp_path, model):
    data = write_data(tmp_path / "d.jsonl")
    items, settings = settings_for(data)  # generation and NLL
    specs = [*SPECS, MethodSpec("refine-self", "refine-self"), MethodSpec("maj@2", "maj", votes=2)]
    kw = dict(batch_size=2, progress=False, refine_fn=FakeRefine(), log=lambda _m: None)
    full = tmp_path / "full"
    run_evaluation(model, TOK, items, specs, full, settings, clock=Clock(), **kw)

    part = tmp_path / "part"
    seen = []

    def interrupt(name, rows):
        seen.append(name)
        if len(seen) == 4:  # base's 3 batches, then vps's first: stop in the middle of vps
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_evaluation(model, TOK, items, specs, part, settings, clock=Clock(), on_batch=interrupt, **kw)
    old = _as_format1(part)  # as the code before format 2 left it
    written = run_evaluation(model, TOK, items, specs, part, settings, clock=Clock(), **kw)
    assert written == {"base": 0, "vps": 3, "refine-self": 5, "maj@2": 5}
    assert _untimed(_rows(part)) == _untimed(_rows(full))
    assert json.loads((part / "run.json").read_text()) == old  # the run keeps its record


@pytest.mark.parametrize(("key", "value"), [
    ("batch_order", "input"), ("batch_order", None), ("nll_scoring", "recompute"), ("nll_scoring", None),
    ("refine_batching", "item"), ("refine_batching", None), ("refine_sampling", "global"),
    ("refine_sampling", None)])
def test_a_run_of_format_1_computed_another_way_is_refused_naming_the_setting(tmp_path, model, key, value):
    data = write_data(tmp_path / "d.jsonl")
    items, settings = settings_for(data)
    specs = [*SPECS, MethodSpec("refine-self", "refine-self")]
    kw = dict(batch_size=2, progress=False, refine_fn=FakeRefine(), log=lambda _m: None)
    out = tmp_path / "out"
    run_evaluation(model, TOK, items[:2], specs, out, settings, **kw)
    _as_format1(out, **{key: value})
    before = (out / "run.json").read_text(), (out / "results.jsonl").read_text()
    with pytest.raises(RunMismatchError) as err:
        run_evaluation(model, TOK, items, specs, out, settings, **kw)
    message = str(err.value)
    assert "\n" not in message and f"{out}/run.json (format 1)" in message and "cannot be resumed" in message
    shown = f"{key} {value!r}" if value is not None else f"no {key} (written before the setting existed)"
    assert f"{shown}, now always {FORMAT1_DEFAULTS[key]!r}" in message
    assert ((out / "run.json").read_text(), (out / "results.jsonl").read_text()) == before  # nothing written
    write_report(out)  # it still reports


def test_a_run_of_format_1_resumes_when_its_other_way_does_not_apply(tmp_path, model):
    """Refine settings do not matter to a run without refine or vote methods, nor NLL scoring without NLL."""
    data = write_data(tmp_path / "d.jsonl")
    items, settings = settings_for(data, nll=False)
    kw = dict(batch_size=2, progress=False, generate_fn=fake_generate({"base": {0}, "vps": {1}}),
              log=lambda _m: None)
    out = tmp_path / "out"
    run_evaluation(model, TOK, items[:2], SPECS, out, settings, **kw)
    _as_format1(out, nll_scoring="recompute", refine_batching=None, refine_sampling="global")
    assert run_evaluation(model, TOK, items, SPECS, out, settings, **kw) == {"base": 3, "vps": 3}
    # adding a method the other way would apply to is refused
    with pytest.raises(RunMismatchError, match="refine_sampling 'global', now always 'streams'"):
        run_evaluation(model, TOK, items, [*SPECS, MethodSpec("maj@2", "maj", votes=2)], out, settings, **kw)


def test_partial_final_line_is_dropped_and_a_bad_middle_line_is_an_error(tmp_path):
    run = RunDir(tmp_path)
    run.append([{"id": "a", "config": "base"}, {"id": "b", "config": "base"}])
    with run.results.open("a") as fh:
        fh.write('{"id": "c", "conf')
    with pytest.warns(UserWarning, match=r"results.jsonl:3: ignoring an unparsable final line"):
        assert [r["id"] for r in run.read_rows(repair=True)] == ["a", "b"]
    assert run.results.read_text().endswith('"base"}\n')  # repaired: appends start on a fresh line
    run.append([{"id": "c", "config": "base"}])
    assert [r["id"] for r in run.read_rows()] == ["a", "b", "c"]
    run.results.write_text('{"id": "a", "config": "x"}\nnot json\n{"id": "b", "config": "x"}\n')
    with pytest.raises(RunMismatchError, match=r"results.jsonl:2: unparsable line"):
        run.read_rows()


def test_rerun_with_other_settings_is_refused(tmp_path, model):
    data = write_data(tmp_path / "d.jsonl")
    items, settings = settings_for(data)
    out = tmp_path / "out"
    gen = fake_generate({"base": set(), "vps": set()})
    kw = dict(progress=False, generate_fn=gen, log=lambda _m: None)
    run_evaluation(model, TOK, items[:2], SPECS, out, settings, **kw)
    _, other = settings_for(data, max_new_tokens=9)
    with pytest.raises(RunMismatchError, match="max_new_tokens: stored 4, now 9"):
        run_evaluation(model, TOK, items[:2], SPECS, out, other, **kw)
    changed = [SPECS[0], MethodSpec("vps", "vps", vps.VPSConfig(gamma=0.3))]
    with pytest.raises(RunMismatchError, match=r"configuration 'vps' changed \(config.gamma\)"):
        run_evaluation(model, TOK, items[:2], changed, out, settings, **kw)
    _, resampled = settings_for(data, data={**settings.data, "sample": 3})
    with pytest.raises(RunMismatchError, match="data.sample"):
        run_evaluation(model, TOK, items[:2], SPECS, out, resampled, **kw)
    # adding a configuration is not a mismatch: its rows are new
    added = [*SPECS, MethodSpec("gamma_0.3", "vps", vps.VPSConfig(gamma=0.3))]
    assert run_evaluation(model, TOK, items[:2], added, out, settings, **kw) == {"base": 0, "vps": 0,
                                                                                  "gamma_0.3": 2}


# -- oracle labels -------------------------------------------------------------------------------------
def test_oracle_label_in_every_output(tmp_path, model, monkeypatch, capsys):
    data = write_data(tmp_path / "d.jsonl")
    fake = FakeRefine()
    monkeypatch.setattr(refine_mod, "_default_refine", lambda: fake)
    monkeypatch.setattr("vps.commands.eval.load", lambda args: (model, TOK))
    out = tmp_path / "out"
    code = cli.main(["eval", "--data", str(data), "--methods", "base,refine-self,refine-oracle", "--out", str(out),
                     "--max-new-tokens", "3", "--system", SYSTEM, "--no-progress", "--limit", "3"])
    assert code == 0
    captured = capsys.readouterr()
    console = captured.out + captured.err
    assert "ORACLE" in console
    assert [ln for ln in captured.out.splitlines() if ln.startswith("refine-oracle")][0].split()[1] == "ORACLE"
    rows = RunDir(out).read_rows()
    assert {r["oracle"] for r in rows if r["config"] == "refine-oracle"} == {True}
    assert {r["oracle"] for r in rows if r["config"] != "refine-oracle"} == {False}
    # only the oracle mode saw the gold answers
    assert [c["gold"] for c in fake.calls if c["mode"] == "self"] == [None] * 3
    assert sorted(c["gold"] for c in fake.calls if c["mode"] == "oracle") == [6.0, 7.0, 12.0]
    report = (out / REPORT_MD).read_text()
    oracle_lines = [ln for ln in report.splitlines() if "`refine-oracle`" in ln and ln.startswith("|")]
    assert len(oracle_lines) == 3  # accuracy, difference and cost tables (no NLL for this run)
    assert all("**ORACLE**" in ln for ln in oracle_lines)
    assert not any("ORACLE" in ln for ln in report.splitlines() if "`refine-self`" in ln and ln.startswith("|"))
    summary = json.loads((out / SUMMARY_JSON).read_text())
    assert {e["name"]: e["oracle"] for e in summary["configs"]}["refine-oracle"] is True
    assert json.loads((out / "run.json").read_text())["configs"]["refine-oracle"]["oracle"] is True


def test_refine_rows_are_read_in_the_runs_extraction_mode(tmp_path, model):
    # The loop reads its texts flexibly; a strict run must still score a boxed-only final text as
    # giving no answer, as it scores a base output.
    data = write_data(tmp_path / "d.jsonl")
    items, settings = settings_for(data, extract_mode="strict", nll=False)

    def boxed_refine(model, tokenizer, prompts, golds=None, **kw):
        out = []
        for gold in golds:
            text = f"so \\boxed{{{gold:g}}}"
            out.append(FakeRefineResult(oracle=True, mode="oracle", best_text=text, best_answer=extract_answer(text)))
        return out

    spec = [MethodSpec("refine-oracle", "refine-oracle")]
    run_evaluation(model, TOK, items[:2], spec, tmp_path / "strict", settings, batch_size=2, progress=False,
                   refine_fn=boxed_refine, clock=Clock(), log=lambda _m: None)
    rows = RunDir(tmp_path / "strict").read_rows()
    assert [(r["correct"], r["pred"]) for r in rows] == [(False, None)] * 2
    _, flexible = settings_for(data, nll=False)
    run_evaluation(model, TOK, items[:2], spec, tmp_path / "flexible", flexible, batch_size=2, progress=False,
                   refine_fn=boxed_refine, clock=Clock(), log=lambda _m: None)
    assert [r["correct"] for r in RunDir(tmp_path / "flexible").read_rows()] == [True, True]


def test_default_refine_is_the_library_function(monkeypatch):
    fake = types.ModuleType("vps.refinement.loop")
    fake.refine_many = lambda *a, **k: None
    monkeypatch.setitem(sys.modules, "vps.refinement.loop", fake)
    assert refine_mod._default_refine() is fake.refine_many


# -- data ------------------------------------------------------------------------------------------
def test_malformed_lines_are_reported_and_skipped(tmp_path, model, monkeypatch, capsys):
    data = write_data(tmp_path / "d.jsonl", malformed=True)
    monkeypatch.setattr("vps.commands.eval.load", lambda args: (model, TOK))
    out = tmp_path / "out"
    with pytest.warns(UserWarning) as record:
        code = cli.main(["eval", "--data", str(data), "--methods", "base", "--nll-only", "--out", str(out),
                         "--no-progress", "--system", SYSTEM])
    assert code == 0
    messages = [str(w.message) for w in record]
    assert any("d.jsonl:3: invalid JSON" in m for m in messages)
    assert any("d.jsonl:7: missing field 'answer'" in m for m in messages)
    err = capsys.readouterr().err
    assert "5 items from" in err and "2 malformed line(s) skipped" in err
    rows = RunDir(out).read_rows()
    assert len(rows) == 5 and "broken" not in json.dumps(rows)
    assert "2 malformed line(s) skipped" in (out / REPORT_MD).read_text()
    assert json.loads((out / "run.json").read_text())["data"]["skipped"] == 2


# -- NLL -----------------------------------------------------------------------------------------------
PROMPTS = ["user: Tom has 3 apples.\nassistant:", "user: Six?\nassistant:", "user: A longer question here.\nassistant:"]
SOLUTIONS = [" 3 + 4 = 7\n#### 7", " 12", " It is 6 because 10 - 4 = 6.\n#### 6"]


def _reference_nll(model, prompt: str, solution: str) -> float:
    """One unpadded row: a teacher-forced forward over prompt + solution."""
    p = TOK(prompt, add_special_tokens=False)["input_ids"]
    s = TOK(solution, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + s])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    logp = torch.log_softmax(logits[len(p) - 1: -1], dim=-1)
    return float(-logp.gather(-1, torch.tensor(s).unsqueeze(-1)).mean())


def _cached_decode_nll(model, prompt: str, solution: str) -> float:
    """What KV-cached decoding computes: prefill the prompt, then feed the solution with the cache."""
    p = TOK(prompt, add_special_tokens=False)["input_ids"]
    s = TOK(solution, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        first = model(input_ids=torch.tensor([p]), use_cache=True)
        rest = model(input_ids=torch.tensor([s[:-1]]), use_cache=True,
                     **{cache_argument(model): output_cache(first)})
    logits = torch.cat([first.logits[0, -1:], rest.logits[0]]).float()
    logp = torch.log_softmax(logits, dim=-1)
    return float(-logp.gather(-1, torch.tensor(s).unsqueeze(-1)).mean())


def test_nll_base_equals_the_unpatched_model(model):
    ref = [_reference_nll(model, p, s) for p, s in zip(PROMPTS, SOLUTIONS, strict=True)]
    got = solution_nll(model, TOK, PROMPTS, SOLUTIONS)  # batched, left padded
    assert [r.nll for r in got] == pytest.approx(ref, abs=1e-5)
    assert [r.tokens for r in got] == [len(s) for s in SOLUTIONS]
    vps.patch(model, vps.VPSConfig())
    try:
        with vps.disabled(model):
            assert [r.nll for r in solution_nll(model, TOK, PROMPTS, SOLUTIONS)] == pytest.approx(ref, abs=1e-5)
    finally:
        vps.unpatch(model)


def test_nll_of_a_patched_model_uses_prompt_only_selectors(model):
    vps.patch(model, vps.VPSConfig())
    try:
        prompt_only = [r.nll for r in solution_nll(model, TOK, PROMPTS, SOLUTIONS)]
        joint = [r.nll for r in solution_nll(model, TOK, PROMPTS, SOLUTIONS, selection="joint")]
        # selectors built on prompt + solution (the gold tokens) give other numbers...
        assert max(abs(a - b) for a, b in zip(prompt_only, joint, strict=True)) > 1e-4
        # ...while prompt-only selection is what cached decoding computes, row by row, unpadded
        cached = [_cached_decode_nll(model, p, s) for p, s in zip(PROMPTS, SOLUTIONS, strict=True)]
        assert prompt_only == pytest.approx(cached, abs=1e-5)
    finally:
        vps.unpatch(model)
    base = [_reference_nll(model, p, s) for p, s in zip(PROMPTS, SOLUTIONS, strict=True)]
    assert max(abs(a - b) for a, b in zip(prompt_only, base, strict=True)) > 1e-4  # VPS changed something


@pytest.mark.parametrize("decode_mode", ["frozen", "dynamic"])
def test_nll_cached_scoring_equals_recompute(model, decode_mode):
    prompts, solutions = [*PROMPTS, PROMPTS[0]], [*SOLUTIONS, ""]  # an empty solution scores None
    # Dynamic decoding would re-select on the chunk; cached scoring keeps the prompt's plans anyway.
    vps.patch(model, vps.VPSConfig(decode_mode=decode_mode))
    try:
        cached = solution_nll(model, TOK, prompts, solutions, scoring="cached")
        recompute = solution_nll(model, TOK, prompts, solutions, scoring="recompute")
    finally:
        vps.unpatch(model)
    assert cached[-1].nll is None and recompute[-1].nll is None
    assert [r.tokens for r in cached] == [r.tokens for r in recompute]
    assert [r.nll for r in cached[:-1]] == pytest.approx([r.nll for r in recompute[:-1]], abs=1e-5)
    with pytest.raises(ValueError, match="scoring"):
        solution_nll(model, TOK, prompts, solutions, scoring="fast")


# -- grids -------------------------------------------------------------------------------------------
def test_seed_grid_loads():
    specs = load_grid()
    names = [s.name for s in specs]
    assert names == ["baseline", "default", "no_qk_coupling", "no_lbfgs", "gamma_0.3", "gamma_0.7", "rank_1",
                     "rank_4", "order_1", "order_2", "builder_sk", "builder_sc", "builder_hybrid", "tau_0.5",
                     "tau_1.0", "fixed_rank", "fixed_gamma", "topk_16", "topk_64"]
    by = {s.name: s for s in specs}
    assert by["baseline"].method == "base" and by["baseline"].config is None
    assert by["default"].config == vps.VPSConfig()
    assert by["gamma_0.3"].config.gamma == 0.3 and by["topk_16"].config.topk == 16
    assert not by["fixed_rank"].config.adaptive_rank and not by["no_qk_coupling"].config.qk_coupling
    assert {s.method for s in specs} == {"base", "vps"}


@pytest.mark.parametrize("grid, needles", [
    ({"fast": {"gama": 0.3}}, ["'fast'", "gama"]),
    ({"wide": {"rank": 64, "topk": 8}}, ["'wide'", "topk"]),  # {rank: 64} alone widens topk (test_overrides.py)
    ({"neg": {"gamma": -1}}, ["'neg'", "gamma"]),
    ({"b": {"method": "base", "rank": 2}}, ["'b'", "rank"]),
    ({"m": {"method": "sharpen"}}, ["'m'", "method"]),
    ([{"name": "x"}, {"name": "x"}], ["'x'", "duplicate"]),
    ([{"gamma": 0.3}], ["entry 0", "name"]),
    ("just text", ["mapping"]),
])
def test_grid_errors_name_the_configuration_and_key(grid, needles):
    with pytest.raises(GridError) as err:
        parse_grid(grid, source="g.yaml")
    for needle in needles:
        assert needle in str(err.value)


def test_grid_files_yaml_and_json(tmp_path):
    (tmp_path / "g.json").write_text(json.dumps([{"name": "base", "method": "base"}, {"name": "g", "gamma": 0.2}]))
    (tmp_path / "g.yaml").write_text("base: {method: base}\ng:\n  gamma: 0.2\nself:\n  method: refine-self\n")
    assert [(s.name, s.method) for s in load_grid(tmp_path / "g.json")] == [("base", "base"), ("g", "vps")]
    specs = load_grid(tmp_path / "g.yaml")
    assert specs[1].config.gamma == 0.2 and specs[2].method == "refine-self"
    (tmp_path / "bad.yaml").write_text("x: {topk: 1}\n")
    with pytest.raises(GridError, match=r"bad.yaml: configuration 'x': topk must be >= rank"):
        load_grid(tmp_path / "bad.yaml")
    with pytest.raises(GridError, match="does not exist"):
        load_grid(tmp_path / "missing.yaml")


def test_grid_entry_starts_from_a_config_file(tmp_path):
    sub = tmp_path / "study"
    sub.mkdir()
    vps.VPSConfig(rank=3, topk=8, gamma=0.2, builder="sk").save(sub / "best.json")
    grid = sub / "g.yaml"
    grid.write_text("base: {method: base}\ntuned: {config: best.json}\nsharper: {config: best.json, gamma: 0.4}\n"
                    f"absolute: {{config: {json.dumps(str(sub / 'best.json'))}}}\n")
    by = {s.name: s for s in load_grid(grid)}  # a relative path is read from the grid's folder
    assert by["tuned"].config == vps.VPSConfig.load(sub / "best.json")
    assert by["sharper"].config == vps.VPSConfig(rank=3, topk=8, gamma=0.4, builder="sk")
    assert by["absolute"].config == by["tuned"].config and by["base"].config is None


@pytest.mark.parametrize("body, needles", [
    ("t: {config: missing.json}", ["'t'", "key 'config'", "missing.json", "does not exist"]),
    ("t: {config: 3}", ["'t'", "key 'config'", "path of a VPSConfig file"]),
    ("t: {config: bad.json}", ["'t'", "key 'config'", "bad.json", "rank"]),
    ("t: {config: best.json, topk: 1}", ["'t'", "topk must be >= rank"]),
    ("b: {method: base, config: best.json}", ["'b'", "takes no VPS overrides", "config"]),
])
def test_grid_config_key_errors_name_the_entry_and_file(tmp_path, body, needles):
    vps.VPSConfig(rank=3, topk=8).save(tmp_path / "best.json")
    (tmp_path / "bad.json").write_text(json.dumps({"rank": 0}))
    (tmp_path / "g.yaml").write_text(body + "\n")
    with pytest.raises(GridError) as err:
        load_grid(tmp_path / "g.yaml")
    for needle in needles:
        assert needle in str(err.value)


def test_ablate_cli_loads_the_model_once(tmp_path, model, monkeypatch, capsys):
    data = write_data(tmp_path / "d.jsonl")
    grid = tmp_path / "g.json"
    grid.write_text(json.dumps({"baseline": {"method": "base"}, "g3": {"gamma": 0.3}, "sk": {"builder": "sk"}}))
    loads = []
    monkeypatch.setattr("vps.commands.eval.load", lambda args: loads.append(1) or (model, TOK))
    out = tmp_path / "out"
    args = ["ablate", "--grid", str(grid), "--data", str(data), "--nll-only", "--out", str(out), "--no-progress",
            "--limit", "3", "--batch-size", "2", "--system", SYSTEM]
    assert cli.main(args) == 0
    assert loads == [1] and not vps.is_patched(model)
    rows = RunDir(out).read_rows()
    assert sorted({r["config"] for r in rows}) == ["baseline", "g3", "sk"] and len(rows) == 9
    assert all(r["output"] is None and r["seconds"] == r["nll_seconds"] for r in rows)
    report = (out / REPORT_MD).read_text()
    assert "## Gold-solution NLL" in report and "## Accuracy" not in report
    before = report
    (out / REPORT_MD).unlink()
    assert cli.main(["ablate", "--report-only", "--out", str(out)]) == 0
    assert (out / REPORT_MD).read_text() == before and (out / "report.png").stat().st_size > 0
    assert cli.main(["ablate", "--list", "--grid", str(grid)]) == 0
    assert "g3: vps {'gamma': 0.3}" in capsys.readouterr().out


def test_refine_methods_with_the_library_refine(tmp_path, model):
    pytest.importorskip("vps.refinement.loop")
    data = write_data(tmp_path / "d.jsonl")
    items, settings = settings_for(data, nll=False, max_new_tokens=3, refine_iters=2, refine_k_samples=2)
    specs = [MethodSpec("refine-self", "refine-self"), MethodSpec("refine-oracle", "refine-oracle")]
    out = tmp_path / "out"
    run_evaluation(model, TOK, items[:2], specs, out, settings, progress=False, log=lambda _m: None)
    rows = RunDir(out).read_rows()
    assert [(r["config"], r["oracle"]) for r in rows] == [("refine-self", False)] * 2 + [("refine-oracle", True)] * 2
    for r in rows:
        assert r["refine"]["oracle"] is r["oracle"] and len(r["refine"]["trace"]) == 2
        assert r["tokens"] > 0 and isinstance(r["correct"], bool)
    # the oracle drew the same samples as refine-self, so it reused them and counts what they cost
    by = {(r["config"], r["id"]): r for r in rows}
    for it in items[:2]:
        own, oracle = by["refine-self", it.id]["refine"], by["refine-oracle", it.id]["refine"]
        assert not own["samples_reused"] and oracle["samples_reused"] and oracle["samples"] == own["samples"]
        assert 0 < oracle["reused_seconds"] <= by["refine-oracle", it.id]["seconds"]
    assert not vps.is_patched(model)


def test_a_resumed_run_reuses_the_samples_its_earlier_rows_recorded(tmp_path, model):
    pytest.importorskip("vps.refinement.loop")
    data = write_data(tmp_path / "d.jsonl")
    items, settings = settings_for(data, nll=False, max_new_tokens=3, refine_iters=2, refine_k_samples=2)
    own, oracle = MethodSpec("refine-self", "refine-self"), MethodSpec("refine-oracle", "refine-oracle")
    out, messages = tmp_path / "out", []
    run_evaluation(model, TOK, items[:2], [own], out, settings, progress=False, log=lambda _m: None)
    # a new process: nothing in memory, only the rows on disk
    run_evaluation(model, TOK, items[:2], [own, oracle], out, settings, progress=False, log=messages.append)
    assert any("2 sample set(s) of 2 item(s) restored" in m for m in messages)
    by = {(r["config"], r["id"]): r for r in RunDir(out).read_rows()}
    fresh_out = tmp_path / "fresh"
    run_evaluation(model, TOK, items[:2], [oracle], fresh_out, settings, progress=False, log=lambda _m: None)
    fresh = {r["id"]: r for r in RunDir(fresh_out).read_rows()}
    for it in items[:2]:
        mine, reused = by["refine-self", it.id]["refine"], by["refine-oracle", it.id]["refine"]
        assert reused["samples_reused"] and not fresh[it.id]["refine"]["samples_reused"]
        assert reused["reused_seconds"] == mine["sample_record"]["seconds"] > 0
        assert reused["samples"] == mine["samples"] == fresh[it.id]["refine"]["samples"]
        assert by["refine-oracle", it.id]["output"] == fresh[it.id]["output"]
    # a damaged record is an error naming the item, not a silent redraw
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    rows[0]["refine"]["sample_record"]["tokens"] = "many"
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "run.json").write_text((out / "run.json").read_text())
    (damaged / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(RunMismatchError, match=f"item {rows[0]['id']!r}.*'tokens'"):
        run_evaluation(model, TOK, items[:3], [own, oracle], damaged, settings, progress=False, log=lambda _m: None)


def test_refinement_runs_in_batches_with_per_item_sample_streams(tmp_path, model):
    data = write_data(tmp_path / "d.jsonl")
    items, settings = settings_for(data, nll=False)
    spec = [MethodSpec("refine-self", "refine-self")]
    fake = FakeRefine()
    out = tmp_path / "out"
    run_evaluation(model, TOK, items[:3], spec, out, settings, batch_size=2, progress=False, refine_fn=fake,
                   log=lambda _m: None)
    stored = json.loads((out / "run.json").read_text())
    assert stored["format"] == 2 and not set(FORMAT1_DEFAULTS) & set(stored)  # no longer settings of a run
    assert fake.batches == [2, 1] and fake.samplings == ["streams"] * 2
    rows = RunDir(out).read_rows()
    assert [r["batch_size"] for r in rows] == [2, 2, 1]


def test_a_run_written_before_a_config_field_existed_still_resumes(tmp_path, model):
    data = write_data(tmp_path / "d.jsonl")
    items, settings = settings_for(data)
    out = tmp_path / "out"
    gen = fake_generate({"base": set(), "vps": set()})
    kw = dict(progress=False, generate_fn=gen, log=lambda _m: None)
    run_evaluation(model, TOK, items[:1], SPECS, out, settings, **kw)
    stored = json.loads((out / "run.json").read_text())
    del stored["configs"]["vps"]["config"]["damping"]  # as a run of an older vps wrote it
    (out / "run.json").write_text(json.dumps(stored))
    assert run_evaluation(model, TOK, items[:2], SPECS, out, settings, **kw) == {"base": 1, "vps": 1}
    damped = [SPECS[0], MethodSpec("vps", "vps", vps.VPSConfig(damping=True))]
    with pytest.raises(RunMismatchError, match=r"configuration 'vps' changed \(config.damping\)"):
        run_evaluation(model, TOK, items[:2], damped, out, settings, **kw)


@pytest.mark.parametrize("body, needle", [
    ("a: {gamma: 0.3}\nb: {gamma: 0.2}\na: {rank: 3}\n", "line 3: key 'a' appears twice (first on line 1)"),
    ("a: {gamma: 0.3, gamma: 0.2}\n", "key 'gamma' appears twice"),
])
def test_grid_yaml_refuses_duplicate_keys(tmp_path, body, needle):
    (tmp_path / "g.yaml").write_text(body)
    with pytest.raises(GridError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        load_grid(tmp_path / "g.yaml")


def test_yaml_reads_scientific_notation_as_numbers():
    from vps.strict_yaml import safe_load

    assert safe_load("a: 1e-300\nb: 2E5\nc: 1.5e3\nd: '1e3'\ne: 1e\n") == {
        "a": 1e-300, "b": 2e5, "c": 1500.0, "d": "1e3", "e": "1e"}


def test_refine_and_vote_methods_stop_at_the_runs_stop_strings(tmp_path, model):
    """The run's --stop ends the samples that maj@K votes over and refinement's samples and decodes, as it ends
    the base and vps methods' generation: their answers and token counts stop where the text does."""
    data = write_data(tmp_path / "d.jsonl")
    specs = [MethodSpec("maj@2", "maj", votes=2), MethodSpec("refine-self", "refine-self")]
    kw = dict(nll=False, max_new_tokens=12, refine_iters=2, refine_k_samples=2)

    def run(out: Path, stops: list[str]) -> list[dict]:
        items, settings = settings_for(data, stop_strings=stops, **kw)
        assert settings.refine_config().stop_strings == tuple(stops)
        run_evaluation(model, TOK, items[:2], specs, out, settings, progress=False, log=lambda _m: None)
        return RunDir(out).read_rows()

    def texts(rows: list[dict]) -> list[str]:
        found = []
        for row in rows:
            held = row.get("refine") or row.get("vote")
            found += held["sample_record"]["texts"] + [t["text"] for t in (row.get("refine") or {}).get("trace", [])]
        return found

    free = run(tmp_path / "free", [])
    stop = stop_inside(texts(free))
    stopped = run(tmp_path / "stopped", [stop])
    assert texts(stopped) and not any(stop in t for t in texts(stopped))
    for config in ("maj@2", "refine-self"):
        assert sum(r["tokens"] for r in stopped if r["config"] == config) < \
            sum(r["tokens"] for r in free if r["config"] == config), config


def test_checkpoint_activations_writes_the_same_refine_rows(tmp_path, model, monkeypatch):
    """``vps eval --checkpoint-activations``: the refine methods' steps recompute the blocks' activations in the
    backward (`vps.refinement.checkpointing`), and every row but its timings is what the run writes without it."""
    from vps.refinement import loop

    data = write_data(tmp_path / "d.jsonl")
    monkeypatch.setattr("vps.commands.eval.load", lambda args: (model, TOK))
    entered = []
    real = loop.checkpointed_blocks
    monkeypatch.setattr(loop, "checkpointed_blocks", lambda m: entered.append(1) or real(m))

    def run(out: Path, *extra: str) -> list[dict]:
        args = ["eval", "--data", str(data), "--methods", "refine-self", "--out", str(out), "--no-progress",
                "--limit", "2", "--batch-size", "2", "--system", SYSTEM, "--max-new-tokens", "4", "--iters", "2",
                "--k-samples", "2", *extra]
        assert cli.main(args) == 0
        return RunDir(out).read_rows()

    def untimed(value):
        if isinstance(value, dict):
            return {k: untimed(v) for k, v in value.items() if "seconds" not in k}
        return [untimed(v) for v in value] if isinstance(value, list) else value

    kept = run(tmp_path / "kept")
    assert not entered
    checkpointed = run(tmp_path / "checkpointed", "--checkpoint-activations")
    assert entered, "the refinement steps ran under checkpointed_blocks"
    assert any(row.get("surrogate") for r in kept for row in r["refine"]["trace"])
    assert untimed(checkpointed) == untimed(kept)
    # no setting of the run: the run's record is the same
    assert (tmp_path / "kept" / "run.json").read_text() == (tmp_path / "checkpointed" / "run.json").read_text()


def test_the_progress_bar_shows_the_refinement_phase(tmp_path, model, capsys):
    """A refine batch runs for minutes on a CPU: beside its bar, ``vps eval`` says which phase it is in."""
    data = write_data(tmp_path / "d.jsonl")
    items, settings = settings_for(data, nll=False, max_new_tokens=3, refine_iters=2, refine_k_samples=2)
    run_evaluation(model, TOK, items[:2], [MethodSpec("refine-self", "refine-self")], tmp_path / "out", settings,
                   progress=True, log=lambda _m: None)
    err = capsys.readouterr().err
    assert "refine-self" in err and "sampling 2 per prompt" in err and "iteration 2/2: refinement step" in err
