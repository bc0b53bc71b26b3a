"""Refinement against voting at equal compute: model passes per row, the paired comparison in summary.json and
report.md, and the sentence the digest writes from it."""

from __future__ import annotations

import pytest

from vps.evaluation.digest import against_voting
from vps.evaluation.methods import find_method
from vps.evaluation.report import render_markdown
from vps.evaluation.stats import compare_paired
from vps.evaluation.summary import summarize_run

N = 8
# refine right on items 0-5, maj@4 on 0-2 and 6: refinement alone right on 3, 4, 5; voting alone on 6.
REFINE_RIGHT, VOTE_RIGHT = {0, 1, 2, 3, 4, 5}, {0, 1, 2, 6}


def _trace(steps: int) -> list[dict]:
    # iteration 0 decodes only; every later one first takes a surrogate step
    return [{"iter": 0}] + [{"iter": i, "surrogate": {"loss": 1.0}} for i in range(1, steps + 1)]


def _row(config: str, method: str, i: int, correct: bool, tokens: int, seconds: float, **extra) -> dict:
    return {"id": f"t-{i}", "index": i, "config": config, "method": method, "oracle": False, "correct": correct,
            "tokens": tokens, "seconds": seconds, "nll": None, **extra}


def _run(with_vote: bool = True) -> tuple[dict, list[dict]]:
    configs = {"base": {"method": "base", "oracle": False, "config": None},
               "refine-self": {"method": "refine-self", "oracle": False, "config": {}}}
    rows = [_row("base", "base", i, i < 2, 100, 10.0) for i in range(N)]
    rows += [_row("refine-self", "refine-self", i, i in REFINE_RIGHT, 700, 70.0, refine={"trace": _trace(2)})
             for i in range(N)]
    if with_vote:
        configs["maj@4"] = {"method": "maj", "oracle": False, "config": None, "votes": 4}
        rows += [_row("maj@4", "maj", i, i in VOTE_RIGHT, 400, 35.0, vote={"k": 4}) for i in range(N)]
    settings = {"model": "m", "dtype": "float32", "data": {"n_items": N}, "generate": True, "nll": False,
                "max_new_tokens": 8, "temperature": 0.0, "stop_strings": [], "extract_mode": "flexible",
                "baseline": "base", "configs": configs}
    return settings, rows


def test_each_method_counts_its_model_passes():
    refine = find_method("refine-self")
    assert refine is not None and refine.passes(_row("r", "refine-self", 0, True, 700, 1.0,
                                                     refine={"trace": _trace(2)})) == (702, 2)
    vote, base = find_method("maj"), find_method("base")
    assert vote is not None and vote.passes(_row("m", "maj", 0, True, 400, 1.0)) == (400, 0)
    assert base is not None and base.passes({"tokens": None}) is None  # an NLL-only row spent no generation


def test_refinement_is_paired_with_voting_on_accuracy_and_compute():
    settings, rows = _run()
    summary = summarize_run(settings, rows)
    entries = {e["name"]: e for e in summary["configs"]}
    assert entries["refine-self"]["passes"] == {"rows": N, "forward_mean": 702.0, "backward_mean": 2.0}
    assert entries["maj@4"]["passes"] == {"rows": N, "forward_mean": 400.0, "backward_mean": 0.0}
    (versus,) = summary["versus"]
    want = compare_paired([i in VOTE_RIGHT for i in range(N)], [i in REFINE_RIGHT for i in range(N)],
                          None, None, [35.0] * N, [70.0] * N)
    assert versus["refine"] == "refine-self" and versus["vote"] == "maj@4" and versus["n"] == N
    assert versus["accuracy_diff"] == pytest.approx(want["accuracy_diff"]) == pytest.approx(2 / N)
    assert versus["accuracy_diff_ci"] == list(want["accuracy_diff_ci"])
    assert versus["mcnemar_p"] == want["mcnemar_p"]
    assert (versus["refine_only_correct"], versus["vote_only_correct"]) == (3, 1)
    assert versus["forward_ratio"] == pytest.approx(702 / 400) and versus["seconds_ratio"] == pytest.approx(2.0)
    report = render_markdown(summary, settings["configs"])
    assert "## Refinement against voting" in report
    assert "| `refine-self` | `maj@4` | 8 | 75.0% | 50.0% | +25.0 pp |" in report
    assert "forward passes/item" in report and "| 702.0 | 2.0 |" in report


def test_runs_without_samples_keep_their_summary():
    settings, rows = _run()
    plain = {**settings, "configs": {"base": settings["configs"]["base"],
                                     "vps": {"method": "vps", "oracle": False, "config": {}}}}
    plain_rows = [r for r in rows if r["config"] == "base"] + [
        {**r, "config": "vps", "method": "vps"} for r in rows if r["config"] == "base"]
    summary = summarize_run(plain, plain_rows)
    assert "versus" not in summary and all("passes" not in e for e in summary["configs"])
    assert "forward passes" not in render_markdown(summary, plain["configs"])
    refine_only = summarize_run(*_run(with_vote=False))  # passes, but nothing to pair with
    assert "versus" not in refine_only and "passes" in refine_only["configs"][1]


@pytest.mark.parametrize("p, diff, ratio, n, says", [
    (0.5, 0.04, 1.8, 50, "refinement does not beat voting, although it spends more compute"),
    (0.01, 0.2, 1.8, 50, "refinement beats voting, but spends more compute: not shown at equal compute"),
    (0.01, 0.2, 0.9, 50, "refinement beats voting at equal or lower compute"),
    (0.01, -0.2, 1.8, 50, "voting beats refinement, which spends more"),
    (0.5, 0.0, 1.0, 50, "no measurable difference between refinement and voting"),
    (0.5, 0.0, 1.8, 20, "(so far; incomplete: decides nothing yet)"),
])
def test_the_digest_says_whether_refinement_beats_voting_at_equal_compute(p, diff, ratio, n, says):
    comparison = {"refine": "refine-self", "vote": "maj@4", "n": n, "refine_accuracy": 0.5 + diff,
                  "vote_accuracy": 0.5, "accuracy_diff": diff, "accuracy_diff_ci": [diff - 0.1, diff + 0.1],
                  "mcnemar_p": p, "forward_ratio": ratio, "seconds_ratio": 2 * ratio}
    text = against_voting(comparison, 50)
    assert says in text and f"at {ratio:.2f}x voting's forward passes and {2 * ratio:.2f}x its seconds" in text
    # seconds decide nothing: the same comparison with other seconds says the same
    assert says in against_voting({**comparison, "seconds_ratio": 0.1}, 50)
    assert text.startswith("refinement (`refine-self`) against voting (`maj@4`)")


def test_a_run_marked_versus_adds_the_comparison_to_its_models_verdict(tmp_path):
    import json

    from vps.evaluation.digest import build_results, load_index
    from vps.evaluation.rundir import RESULTS_FILE, RUN_FILE, RUN_FORMAT

    settings, rows = _run()
    run = tmp_path / "vote"
    run.mkdir()
    (run / RUN_FILE).write_text(json.dumps({"format": RUN_FORMAT, **settings}))
    (run / RESULTS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    index = tmp_path / "index.json"
    index.write_text(json.dumps({"title": "Results", "sections": [
        {"title": "Votes", "dir": "vote", "command": "vps eval --out vote", "verdict": "Tiny", "versus": "Tiny"}]}))
    head = build_results(load_index(index), tmp_path).split("## Summary")[0]
    line = next(ln for ln in head.splitlines() if ln.startswith("- **Tiny**"))
    assert ("refinement (`refine-self`) against voting (`maj@4`): refinement does not beat voting, although it "
            "spends more compute (75.0% vs 50.0%, +25.0 pp") in line
    assert "at 1.75x voting's forward passes" in line and "whether refinement beats voting at equal compute" in head
