"""Prompt styles (tutor, boxed, fewshot): rendering, the harness's use of them, stored settings, the CLI."""

from __future__ import annotations

import json

import pytest

from tests.helpers.tiny_eval import SPECS, fake_generate, settings_for, tiny_tokenizer, write_data
from vps import cli
from vps.evaluation import RunMismatchError, run_evaluation
from vps.prompting import BOXED_SYSTEM, DEFAULT_SYSTEM, PromptFormat

TOK = tiny_tokenizer()
POOL = tuple((f"q{i}?", f"work {i} #### {i}") for i in range(4))


@pytest.mark.parametrize("name, question, expected_shots", [
    ("an unseen question sees the first n", "new?", ["q0?", "q1?", "q2?"]),
    ("a shot's own question is skipped", "q1?", ["q0?", "q2?", "q3?"]),
    ("surrounding whitespace does not hide it", "  q0? ", ["q1?", "q2?", "q3?"]),
])
def test_fewshot_renders_lm_eval_format_without_the_item_itself(name, question, expected_shots):
    text = PromptFormat("fewshot", shots=POOL, n_shots=3).render(TOK, question)
    blocks = text.split("\n\n")
    assert [b.split("\n")[0].removeprefix("Question: ") for b in blocks[:-1]] == expected_shots, name
    first = expected_shots[0][1]
    assert blocks[0] == f"Question: q{first}?\nAnswer: work {first} #### {first}"
    assert blocks[-1] == f"Question: {question}\nAnswer:"


@pytest.mark.parametrize("style, system, expected", [
    ("tutor", None, DEFAULT_SYSTEM),
    ("boxed", None, BOXED_SYSTEM),
    ("boxed", "Be brief.", "Be brief."),
    ("fewshot", None, None),
])
def test_system_text_per_style(style, system, expected):
    fmt = PromptFormat(style, system, shots=POOL if style == "fewshot" else (), n_shots=3)
    assert fmt.system_text == expected
    if style != "fewshot":
        assert fmt.render(TOK, "2+2?").startswith(f"system: {expected}\nuser: 2+2?")
        assert fmt.solution_prefix == ""
    else:
        assert fmt.solution_prefix == " "


@pytest.mark.parametrize("kwargs, message", [
    ({"style": "chatty"}, "prompt must be one of"),
    ({"style": "fewshot", "system": "x", "shots": POOL}, "system cannot be given with the fewshot prompt"),
    ({"style": "fewshot", "shots": POOL[:3], "n_shots": 3}, "pool of n_shots"),
    ({"style": "fewshot", "shots": POOL, "n_shots": -1}, "n_shots"),
])
def test_bad_prompt_formats_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PromptFormat(**kwargs)


def test_fewshot_run_prompts_from_gsm8k_train_and_scores_the_solution_after_a_space(tmp_path, model):
    items, settings = settings_for(write_data(tmp_path / "d.jsonl"), prompt="fewshot", shots=2, system=None)
    out = tmp_path / "out"
    run_evaluation(model, TOK, items, SPECS[:1], out, settings, batch_size=2, progress=False,
                   generate_fn=fake_generate({"base": {0}}), log=lambda _m: None)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    train = [json.loads(line) for line in open(settings_train_path(), encoding="utf-8")][:2]
    for r in rows:
        assert r["prompt"].startswith(f"Question: {train[0]['question']}\nAnswer: {train[0]['answer']}\n\n")
        assert r["prompt"].count("Question: ") == 3 and r["prompt"].endswith("\nAnswer:")
        assert r["nll_tokens"] > 0
    stored = json.loads((out / "run.json").read_text())
    assert stored["prompt"] == "fewshot" and stored["shots"] == 2 and stored["system"] is None
    # the NLL was scored on " " + solution: one token more than the bare solution in this tokenizer
    item = next(it for it in items if it.id == rows[0]["id"])
    assert rows[0]["nll_tokens"] == len(TOK(" " + item.answer, add_special_tokens=False)["input_ids"])
    # another style, or another shot count, is another run
    for change in ({"prompt": "tutor", "shots": 5, "system": None}, {"shots": 3}):
        items2, other = settings_for(tmp_path / "d.jsonl", **{"prompt": "fewshot", "shots": 2, "system": None,
                                                              **change})
        with pytest.raises(RunMismatchError, match="prompt|shots"):
            run_evaluation(model, TOK, items2, SPECS[:1], out, other, batch_size=2, progress=False,
                           generate_fn=fake_generate({"base": {0}}), log=lambda _m: None)


def settings_train_path():
    from vps.evaluation.data import gsm8k_path

    return gsm8k_path("train")


def test_a_run_from_before_prompt_styles_resumes_as_tutor(tmp_path, model):
    items, settings = settings_for(write_data(tmp_path / "d.jsonl"))
    out = tmp_path / "out"
    run_evaluation(model, TOK, items[:2], SPECS[:1], out, settings, batch_size=2, progress=False,
                   generate_fn=fake_generate({"base": {0}}), log=lambda _m: None)
    stored = json.loads((out / "run.json").read_text())
    assert stored["prompt"] == "tutor" and "shots" not in stored
    del stored["prompt"]
    (out / "run.json").write_text(json.dumps(stored))
    written = run_evaluation(model, TOK, items[:3], SPECS[:1], out, settings, batch_size=2, progress=False,
                             generate_fn=fake_generate({"base": {0}}), log=lambda _m: None)
    assert written == {"base": 1}
    _, boxed = settings_for(tmp_path / "d.jsonl", prompt="boxed", system=None)
    with pytest.raises(RunMismatchError, match="prompt"):
        run_evaluation(model, TOK, items, SPECS[:1], out, boxed, batch_size=2, progress=False,
                       generate_fn=fake_generate({"base": {0}}), log=lambda _m: None)


def test_nll_only_runs_compare_the_system_prompt(tmp_path, model):
    items, settings = settings_for(write_data(tmp_path / "d.jsonl"), generate=False)
    out = tmp_path / "out"
    run_evaluation(model, TOK, items, SPECS[:1], out, settings, batch_size=2, progress=False, log=lambda _m: None)
    _, other = settings_for(tmp_path / "d.jsonl", generate=False, system="Another system prompt.")
    with pytest.raises(RunMismatchError, match="system"):
        run_evaluation(model, TOK, items, SPECS[:1], out, other, batch_size=2, progress=False, log=lambda _m: None)


@pytest.mark.parametrize("argv, message", [
    (["--prompt", "fewshot", "--system", "x"], "--system cannot be given with the fewshot prompt"),
    (["--prompt", "fewshot", "--shots", "0"], "--shots must be in [1, 64], got 0"),
])
def test_cli_refuses_bad_prompt_options_before_loading(tmp_path, capsys, argv, message):
    data = write_data(tmp_path / "d.jsonl")
    out = tmp_path / "out"
    rc = cli.main(["eval", "--model", str(tmp_path / "no-such-model"), "--data", str(data), "--out", str(out),
                   "--methods", "base", *argv])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
