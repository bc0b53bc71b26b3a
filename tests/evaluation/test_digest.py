"""RESULTS.md generation: status, findings and tables come from the run directories."""

from __future__ import annotations

import json

import pytest

from tests.helpers.tiny_eval import SPECS, fake_generate, settings_for, tiny_tokenizer, write_data
from vps.evaluation import run_evaluation
from vps.evaluation.digest import ResultsIndexError, build_results, finding, load_index, main, standing

TOK = tiny_tokenizer()
pytestmark = pytest.mark.usefixtures("one_thread")


def _run(tmp_path, model, limit=None):
    data = write_data(tmp_path / "d.jsonl")
    items, settings = settings_for(data, nll=False)
    items = items if limit is None else items[:limit]
    gen = fake_generate({"base": {0, 1}, "vps": {1, 2, 3}})
    run_evaluation(model, TOK, items, SPECS, tmp_path / "run", settings, batch_size=2, progress=False,
                   generate_fn=gen, log=lambda _m: None)
    return items


def _index(tmp_path, **section):
    sec = {"title": "Accuracy, tiny", "dir": "run", "command": "vps eval --out run", **section}
    path = tmp_path / "index.json"
    path.write_text(json.dumps({"title": "Results", "intro": "Intro text.", "sections": [sec]}))
    return path


def test_results_are_built_from_the_run(tmp_path, model):
    _run(tmp_path, model)
    text = build_results(load_index(_index(tmp_path, preliminary=True)), tmp_path)
    assert text.startswith("# Results\n\nIntro text.")
    assert "## Accuracy, tiny (preliminary)\n" in text and "(partial)" not in text
    assert "Status: complete: 2 configuration(s) x 5 items." in text
    # base is right on items 0, 1 and vps on 1, 2, 3: +20 pp, 1 flip to wrong and 2 to correct
    assert "`vps` on 5 paired items: accuracy +20.0 pp" in text
    assert "no significant accuracy difference (McNemar)" in text
    assert "| `vps` | vps | 5 | 3 | 60.0% |" in text  # the run's own accuracy table, embedded
    assert "![Accuracy, tiny](run/report.png)" in text and "\n### Accuracy\n" in text
    assert "`run/results.jsonl`" in text


def test_an_incomplete_run_is_marked_partial(tmp_path, model):
    items = _run(tmp_path, model, limit=3)
    settings = json.loads((tmp_path / "run" / "run.json").read_text())
    assert settings["data"]["n_items"] == 5 and len(items) == 3
    text = build_results(load_index(_index(tmp_path)), tmp_path)
    assert "## Accuracy, tiny (partial)" in text
    assert "unfinished (rerun the command to resume): `base` 3/5, `vps` 3/5" in text
    assert "on 3 paired items of 5 (incomplete)" in text


def test_nll_findings_follow_the_interval():
    entry = {"name": "x", "vs_baseline": {"n": 10, "nll_diff": -0.1, "nll_diff_ci": [-0.2, -0.05]}}
    assert "lower NLL than the baseline" in finding(entry, 10)
    entry["vs_baseline"]["nll_diff_ci"] = [-0.2, 0.05]
    assert "no significant NLL difference" in finding(entry, 10)
    entry["vs_baseline"].update(nll_diff=0.1, nll_diff_ci=[0.05, 0.2])
    assert "higher NLL than the baseline" in finding(entry, 10)
    assert finding({"name": "base", "vs_baseline": None}, 10) is None
    oracle = {"name": "o", "oracle": True, "vs_baseline": {"n": 4, "accuracy_diff": 0.5, "accuracy_diff_ci": [0.1, 0.9],
                                                         "mcnemar_p": 0.01}}
    assert finding(oracle, 4).startswith("`o` (ORACLE) on 4 paired items: accuracy +50.0 pp")
    assert "significant at 5%" in finding(oracle, 4)


def test_a_run_without_a_comparison_states_its_own_figures(tmp_path, model):
    data = write_data(tmp_path / "d.jsonl")
    items, settings = settings_for(data, nll=False)
    gen = fake_generate({"base": {0, 1}})
    run_evaluation(model, TOK, items, SPECS[:1], tmp_path / "run", settings, batch_size=2, progress=False,
                   generate_fn=gen, log=lambda _m: None)
    text = build_results(load_index(_index(tmp_path)), tmp_path)
    summary = text[text.index("## Summary"):text.index("## Accuracy, tiny")]
    assert "no comparison yet" not in summary and "no rows yet" not in summary
    assert ("`base` alone (5 of 5 items; no paired comparison in this run): 2/5 correct (40.0%, Wilson 95% "
            in summary)
    nll_only = {"name": "base", "rows": 3, "n_scored": 0, "accuracy": None, "nll_mean": 0.5591, "n_nll": 3}
    assert standing(nll_only, 10) == ("`base` alone (3 of 10 items (incomplete); no paired comparison in this run): "
                                      "mean gold-solution NLL 0.5591 nats/token on 3 items.")
    assert standing({"name": "vps", "rows": 0}, 10) is None


def test_index_errors_name_the_file_and_field(tmp_path, capsys):
    bad = tmp_path / "index.json"
    bad.write_text(json.dumps({"sections": [{"title": "t", "dir": "d"}]}))
    with pytest.raises(ResultsIndexError, match=r"index.json: sections\[0\].command must be a non-empty string"):
        load_index(bad)
    assert main([str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: cannot read the results index" in capsys.readouterr().err


@pytest.mark.parametrize("name, vs, expected", [
    ("accuracy up, significant", {"n": 50, "accuracy_diff": 0.1, "accuracy_diff_ci": [0.02, 0.2], "mcnemar_p": 0.01},
     "accuracy: helps (+10.0 pp [+2.0, +20.0], McNemar p = 0.01, n = 50)"),
    ("accuracy down, significant", {"n": 50, "accuracy_diff": -0.1, "accuracy_diff_ci": [-0.2, -0.02],
                                    "mcnemar_p": 0.03}, "accuracy: hurts (-10.0 pp"),
    ("accuracy down, not significant", {"n": 50, "accuracy_diff": -0.04, "accuracy_diff_ci": [-0.1, 0.0],
                                        "mcnemar_p": 0.2}, "accuracy: no measurable effect (-4.0 pp"),
    ("NLL lower", {"n": 9, "nll_diff": -0.01, "nll_diff_ci": [-0.02, -0.005]}, "gold-solution NLL: helps (-0.0100"),
    ("NLL higher", {"n": 9, "nll_diff": 0.01, "nll_diff_ci": [0.005, 0.02]}, "gold-solution NLL: hurts (+0.0100"),
    ("NLL unclear", {"n": 9, "nll_diff": 0.01, "nll_diff_ci": [-0.005, 0.02]}, "gold-solution NLL: no measurable"),
])
def test_the_per_model_verdict_follows_the_statistics(name, vs, expected):
    from vps.evaluation.digest import verdict

    assert expected in verdict("M", [("t", vs, vs["n"])]), name
    assert "incomplete" in verdict("M", [("t", vs, vs["n"] + 1)])
    assert verdict("M", []) == "**M**: no finished comparison yet."
    alone = verdict("M", [], [("t", vs, vs["n"])])
    assert alone.startswith("**M**: seed defaults: no finished comparison yet; the configuration tuned on train")
    assert expected in alone


def test_marked_runs_feed_the_verdict_and_missing_runs_are_not_started(tmp_path, model):
    _run(tmp_path, model)
    index = json.loads(_index(tmp_path, verdict="Tiny-Llama").read_text())
    index["sections"].append({"title": "Later run", "dir": "later", "command": "vps eval --out later"})
    (tmp_path / "index.json").write_text(json.dumps(index))
    text = build_results(load_index(tmp_path / "index.json"), tmp_path)
    head = text.split("## Summary")[0]
    assert "## Does VPS help? (per model: the seed defaults, and a tuned configuration" in head
    assert "- **Tiny-Llama**: accuracy: no measurable effect (+20.0 pp" in head
    verdicts = head.split("## Does VPS help?")[1]
    assert "[BENCHMARKS.md, Cost at a glance](BENCHMARKS.md#cost-at-a-glance)" in verdicts, "what it costs, linked"
    assert "## Later run (not started)" in text and "Status: not started (run the command)." in text


def test_a_confirmed_tuned_configuration_joins_the_verdict(tmp_path, model):
    from vps import VPSConfig
    from vps.evaluation import MethodSpec

    data = write_data(tmp_path / "d.jsonl")
    items, settings = settings_for(data, nll=False)
    specs = [*SPECS, MethodSpec("tuned", "vps", VPSConfig(gamma=0.2))]
    gen = fake_generate({"base": {0}, "vps": {0, 1, 2, 3, 4}})  # any patched model: vps and tuned alike
    run_evaluation(model, TOK, items, specs, tmp_path / "run", settings, batch_size=2, progress=False,
                   generate_fn=gen, log=lambda _m: None)
    head = build_results(load_index(_index(tmp_path, verdict="Tiny")), tmp_path).split("## Summary")[0]
    line = next(ln for ln in head.splitlines() if ln.startswith("- **Tiny**"))
    seed, tuned = line.split("; the configuration tuned on train (`tuned`), measured on test: ")
    assert seed.startswith("- **Tiny**: accuracy: no measurable effect (+80.0 pp") and "n = 5" in seed
    assert tuned.startswith("accuracy: no measurable effect (+80.0 pp") and "McNemar p = 0.125, n = 5" in tuned
    # While the tuned rows are partial the line says they decide nothing yet, not "on test".
    rows = (tmp_path / "run" / "results.jsonl").read_text().splitlines()
    kept = [r for r in rows if json.loads(r)["config"] != "tuned" or json.loads(r)["id"] != json.loads(rows[0])["id"]]
    (tmp_path / "run" / "results.jsonl").write_text("\n".join(kept) + "\n")
    head = build_results(load_index(_index(tmp_path, verdict="Tiny")), tmp_path).split("## Summary")[0]
    line = next(ln for ln in head.splitlines() if ln.startswith("- **Tiny**"))
    assert "(`tuned`), measured on test so far (incomplete: decides nothing yet): " in line and "n = 4 of 5" in line


@pytest.mark.parametrize("ci, n, says", [
    ((-0.002, -0.0001), 10, "measured on test: confirmed (its NLL interval lies below 0): gold-solution NLL: helps"),
    ((-0.0003, 0.0008), 10, "measured on test: not confirmed (confirmation needs its NLL interval wholly below 0)"),
    ((-0.002, -0.0001), 9, "measured on test so far (incomplete: decides nothing yet): gold-solution NLL"),
])
def test_a_tuned_nll_confirmation_is_stated_by_the_rule(ci, n, says):
    """Once every test item is in, a configuration tuned on NLL is confirmed only where its interval is below 0;
    an incomplete one is neither."""
    from vps.evaluation.digest import verdict

    vs = {"n": n, "nll_diff": (ci[0] + ci[1]) / 2, "nll_diff_ci": list(ci), "accuracy_diff": None}
    line = verdict("M", [], [("t", vs, 10)])
    assert says in line
    assert ("confirmed" in line) == (n == 10)
