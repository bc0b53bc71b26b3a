"""`vps rescore`: a finished run's answers read again in another extraction mode, without generating."""

from __future__ import annotations

import hashlib
import json

import pytest

from tests.helpers.tiny_eval import (
    QUESTIONS,
    Clock,
    FakeRefine,
    rows_by_config,
    settings_for,
    tiny_tokenizer,
    write_data,
)
from vps.cli import main
from vps.evaluation import MethodSpec, RunMismatchError, compare_paired, rescore_run, run_evaluation
from vps.evaluation.rundir import REPORT_MD, REPORT_PNG
from vps.patching import is_patched

TOK = tiny_tokenizer()
SPECS = [MethodSpec("base", "base"), MethodSpec("vps", "vps"), MethodSpec("refine-oracle", "refine-oracle")]
# vps states a wrong answer first and reaches the gold in a final box on these items
EARLY_WRONG = {0, 1}

pytestmark = pytest.mark.usefixtures("one_thread")


def _generate(model, tokenizer, prompts, max_new_tokens, temperature, seed, stop_strings=None):
    texts = []
    for p in prompts:
        i = next(k for k, (q, _) in enumerate(QUESTIONS) if q in p)
        gold = QUESTIONS[i][1].rsplit("#### ", 1)[1]
        if is_patched(model) and i in EARLY_WRONG:
            texts.append(f"#### 999\nLet me check: the total is \\boxed{{{gold}}}")
        else:
            texts.append(f"so #### {gold}")
    return texts, [3] * len(prompts)


@pytest.fixture
def run_dir(tmp_path, model):
    items, settings = settings_for(write_data(tmp_path / "d.jsonl"), nll=False)
    out = tmp_path / "run"
    run_evaluation(model, TOK, items, SPECS, out, settings, batch_size=2, progress=False, generate_fn=_generate,
                   refine_fn=FakeRefine(), clock=Clock(), log=lambda _m: None)
    return out


def _digest(path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


def test_last_mode_reads_the_conclusion_and_reports_against_the_baseline(run_dir, tmp_path):
    before = _digest(run_dir)
    out = tmp_path / "last"
    summary = rescore_run(run_dir, out, "last")
    assert _digest(run_dir) == before  # the source run is never touched

    original, rescored = rows_by_config(run_dir), rows_by_config(out)
    assert [r["correct"] for r in original["vps"]] == [False, False, True, True, True]
    assert [r["correct"] for r in rescored["vps"]] == [True] * 5
    assert [r["pred_source"] for r in rescored["vps"]][:2] == ["boxed", "boxed"]
    assert all("output" not in r and "prompt" not in r and "refine" not in r for rs in rescored.values() for r in rs)

    entry = {e["name"]: e for e in summary["configs"]}
    expected = compare_paired([r["correct"] for r in rescored["base"]], [r["correct"] for r in rescored["vps"]],
                              base_seconds=[r["seconds"] for r in rescored["base"]],
                              method_seconds=[r["seconds"] for r in rescored["vps"]])
    assert entry["vps"]["vs_baseline"]["accuracy_diff"] == expected["accuracy_diff"] == 0.0
    assert entry["refine-oracle"]["oracle"]

    counts = json.loads((out / "run.json").read_text())["rescored_from"]
    assert counts["dir"] == str(run_dir) and counts["extract_mode"] == "flexible"
    assert counts["configs"]["vps"] == {"rows": 5, "changed": 2, "correct_before": 3, "correct_after": 5}
    assert counts["configs"]["base"]["changed"] == 0

    report = (out / REPORT_MD).read_text()
    assert "answers extracted in last mode" in report and f"outputs stored in `{run_dir}`" in report
    assert "refine rows keep the candidate their loop chose" in report
    assert "| `vps` | 5 | 2 | 3 | 5 |" in report
    assert "`refine-oracle` **ORACLE**" in report
    assert (out / REPORT_PNG).read_bytes()[:4] == b"\x89PNG"


def test_the_runs_own_mode_reproduces_every_row_and_a_rerun_rewrites_the_same(run_dir, tmp_path):
    out = tmp_path / "same"
    summary = rescore_run(run_dir, out, "flexible")
    assert all(c["changed"] == 0 and c["correct_before"] == c["correct_after"]
               for c in summary["rescored_from"]["configs"].values())
    first = _digest(out)
    rescore_run(run_dir, out, "flexible")
    assert _digest(out) == first


def test_a_row_the_current_rules_read_differently_is_refused(run_dir, tmp_path):
    lines = (run_dir / "results.jsonl").read_text().splitlines()
    row = json.loads(lines[0])
    row["pred"] = "41"
    lines[0] = json.dumps(row)
    (run_dir / "results.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(RunMismatchError, match=f"item '{row['id']}'.*extraction rules changed"):
        rescore_run(run_dir, tmp_path / "x", "last")


def test_bad_targets_are_refused(run_dir, tmp_path, model):
    with pytest.raises(ValueError, match="must differ"):
        rescore_run(run_dir, run_dir, "last")
    other = _other_run(tmp_path, model)
    with pytest.raises(RunMismatchError, match="holds a run of its own"):
        rescore_run(run_dir, other, "last")
    rescore_run(run_dir, tmp_path / "r", "last")
    with pytest.raises(ValueError, match="itself a rescored run"):
        rescore_run(tmp_path / "r", tmp_path / "rr", "strict")
    with pytest.raises(FileNotFoundError, match="not an evaluation directory"):
        rescore_run(tmp_path / "nothing", tmp_path / "n2", "last")
    with pytest.raises(ValueError, match="extract mode"):
        rescore_run(run_dir, tmp_path / "m", "loose")


def _other_run(tmp_path, model):
    items, settings = settings_for(write_data(tmp_path / "d2.jsonl"), generate=False)
    out = tmp_path / "nll-run"
    run_evaluation(model, TOK, items[:2], [MethodSpec("base", "base")], out, settings, batch_size=2,
                   progress=False, clock=Clock(), log=lambda _m: None)
    return out


def test_an_nll_only_run_has_nothing_to_rescore(tmp_path, model):
    with pytest.raises(ValueError, match="NLL-only run"):
        rescore_run(_other_run(tmp_path, model), tmp_path / "x", "last")


def test_cli_writes_next_to_the_run_by_default(run_dir, capsys):
    assert main(["rescore", str(run_dir), "--extract", "last"]) == 0
    printed = capsys.readouterr().out
    assert "vps: 2 of 5 answers changed; correct 3 (flexible) -> 5 (last)" in printed
    assert (run_dir.with_name("run-last") / REPORT_MD).exists()
    assert main(["rescore", str(run_dir), "--extract", "strict", "--out", str(run_dir)]) == 2
    assert "must differ" in capsys.readouterr().err


def test_a_vote_row_is_voted_again_in_the_new_mode(tmp_path, model, monkeypatch):
    """A maj@K row's vote depends on how its samples are read: two samples state a wrong answer first and box
    the gold last, one states the gold. Read flexibly the vote is wrong 2:1; read by the last marker all
    three agree on the gold. The rescored row says so, and its votes are those of the new reading."""
    from vps.refinement import loop
    from vps.refinement.samples import DrawnSamples
    from vps.verify import extract_answer

    def draw(model, tokenizer, prompts, config, cache=None):
        drawn = []
        for p in prompts:
            gold = next(a for q, a in QUESTIONS if q in p).rsplit("#### ", 1)[1]
            texts = [f"#### 999\nchecking: \\boxed{{{gold}}}"] * 2 + [f"so #### {gold}"]
            drawn.append(DrawnSamples([extract_answer(t, config.extract_mode) for t in texts], 9, 0.1, texts=texts))
        return "fingerprint", drawn

    monkeypatch.setattr(loop, "draw_samples", draw)
    items, settings = settings_for(write_data(tmp_path / "d.jsonl"), nll=False)
    run = tmp_path / "run"
    run_evaluation(model, TOK, items, [MethodSpec("base", "base"), MethodSpec("maj@3", "maj", votes=3)], run,
                   settings, batch_size=2, progress=False, generate_fn=_generate, clock=Clock(), log=lambda _m: None)
    before = rows_by_config(run)["maj@3"]
    assert all(r["pred"] == "999" and not r["correct"] and r["vote"]["winner_votes"] == 2 for r in before)
    rescore_run(run, tmp_path / "last", "last")
    after = rows_by_config(tmp_path / "last")["maj@3"]
    assert all(r["correct"] and r["vote"]["winner_votes"] == 3 and "sample_record" not in r["vote"] for r in after)
    assert [r["vote"]["answers"] for r in after] == [[r["gold_text"]] * 3 for r in after]
    # and in the run's own mode the vote comes out as stored
    rescore_run(run, tmp_path / "flexible", "flexible")
    same = rows_by_config(tmp_path / "flexible")["maj@3"]
    assert [(r["pred"], r["correct"]) for r in same] == [(r["pred"], r["correct"]) for r in before]
