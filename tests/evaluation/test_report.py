"""report.md / summary.json numbers are `compare_paired` on the JSONL rows; labels and partial runs."""

from __future__ import annotations

import json

import pytest

from tests.helpers.tiny_eval import (
    SPECS,
    Clock,
    fake_generate,
    rows_by_config,
    settings_for,
    tiny_tokenizer,
    write_data,
)
from vps.evaluation import MethodSpec, RunDir, compare_paired, paired_bootstrap_diff, run_evaluation, write_report
from vps.evaluation.report import format_console
from vps.evaluation.rundir import REPORT_MD, REPORT_PNG
from vps.evaluation.summary import pair_stats

TOK = tiny_tokenizer()


pytestmark = pytest.mark.usefixtures("one_thread")


def test_report_numbers_are_compare_paired_on_the_rows(tmp_path, model):
    data = write_data(tmp_path / "d.jsonl")
    items, settings = settings_for(data)
    out = tmp_path / "out"
    # base right on items 0,1,2; vps right on 1,2,3,4: two flips to correct, one to wrong
    gen = fake_generate({"base": {0, 1, 2}, "vps": {1, 2, 3, 4}})
    run_evaluation(model, TOK, items, SPECS, out, settings, batch_size=2, progress=False, generate_fn=gen,
                   clock=Clock(), log=lambda _m: None)
    summary = write_report(out)
    rows = rows_by_config(out)
    b, m = rows["base"], rows["vps"]
    expected = compare_paired([r["correct"] for r in b], [r["correct"] for r in m], [r["nll"] for r in b],
                              [r["nll"] for r in m], [r["seconds"] for r in b], [r["seconds"] for r in m])
    entry = {e["name"]: e for e in summary["configs"]}
    got = entry["vps"]["vs_baseline"]
    for key, value in expected.items():
        assert got[key] == (list(value) if isinstance(value, tuple) else value), key
    assert (got["flips_to_correct"], got["flips_to_wrong"], got["n"]) == (2, 1, 5)
    assert entry["base"]["accuracy"] == expected["base_accuracy"] == 0.6
    assert entry["vps"]["accuracy_ci"] == list(expected["method_accuracy_ci"])
    assert entry["base"]["vs_baseline"] is None

    report = (out / REPORT_MD).read_text()
    lo, hi = expected["accuracy_diff_ci"]
    assert f"| `vps` | vps | 5 | +20.0 pp | [{100 * lo:+.1f}, {100 * hi:+.1f}] | 1 | 2 | 1 |" in report
    assert f"| `base` | base | 5 | 3 | 60.0% | [{100 * expected['base_accuracy_ci'][0]:.1f}," in report
    assert f"{expected['nll_diff']:+.4f}" in report and f"{expected['cost_ratio']:.2f}" in report
    assert "n = 5 items" in report and f"`{data}`" in report and "no sampling" in report
    assert (out / REPORT_PNG).read_bytes()[:4] == b"\x89PNG"
    console = format_console(summary)
    assert "+20.0 pp" in console and "vps" in console


def test_nll_only_pairs_use_the_bootstrap_of_compare_paired(tmp_path, model):
    data = write_data(tmp_path / "d.jsonl")
    items, settings = settings_for(data, generate=False)
    out = tmp_path / "out"
    specs = [MethodSpec("base", "base"), MethodSpec("vps", "vps")]
    run_evaluation(model, TOK, items, specs, out, settings, batch_size=5, progress=False, clock=Clock(),
                   log=lambda _m: None)
    summary = write_report(out)
    rows = rows_by_config(out)
    diff, lo, hi = paired_bootstrap_diff([r["nll"] for r in rows["base"]], [r["nll"] for r in rows["vps"]])
    got = {e["name"]: e for e in summary["configs"]}["vps"]["vs_baseline"]
    assert (got["nll_diff"], got["nll_diff_ci"]) == (diff, [lo, hi])
    assert got["accuracy_diff"] is None and got["mcnemar_p"] is None and got["cost_ratio"] == 1.0
    assert all(r["correct"] is None and r["output"] is None for r in rows["vps"])


def test_incomplete_configs_are_marked_and_paired_on_common_items(tmp_path):
    settings = {"model": "m", "dtype": "float32", "generate": True, "nll": False, "baseline": "base",
                "data": {"source": "x.jsonl", "n_items": 4, "sample": 4, "seed": 3},
                "max_new_tokens": 8, "stop_strings": [], "extract_mode": "flexible",
                "configs": {"base": {"method": "base", "oracle": False},
                            "oracle": {"method": "refine-oracle", "oracle": True}}}
    (tmp_path / "run.json").write_text(json.dumps(settings))
    rows = [{"id": f"i{k}", "index": k, "config": "base", "correct": k < 2, "seconds": 1.0} for k in range(4)]
    rows += [{"id": f"i{k}", "index": k, "config": "oracle", "correct": True, "seconds": 3.0, "oracle": True}
             for k in (1, 2)]
    RunDir(tmp_path).append(rows)
    summary = write_report(tmp_path)
    oracle = {e["name"]: e for e in summary["configs"]}["oracle"]
    assert not oracle["complete"] and oracle["vs_baseline"]["n"] == 2
    assert oracle["vs_baseline"] == {k: list(v) if isinstance(v, tuple) else v for k, v in compare_paired(
        [True, False], [True, True], base_seconds=[1.0, 1.0], method_seconds=[3.0, 3.0]).items()}
    assert pair_stats(rows[:4], rows[4:])["cost_ratio"] == 3.0
    report = (tmp_path / REPORT_MD).read_text()
    assert "| `oracle` **ORACLE** | refine-oracle | 2/4 (incomplete) |" in report
    assert "seeded sample of 4 (seed 3)" in report and "**ORACLE**: `oracle` read the gold answer" in report
    # the cost ratio is paired, and the report says so: the s/item column averages each config over its own items
    assert "cost ratio = seconds per item / baseline's, on the items both have" in report
    assert "with the baseline's on the items both have" in report
    assert "oracle ORACLE" in format_console(summary)


def _nll_rows(values: dict[str, list[float]]) -> list[dict]:
    return [{"id": f"q{i}", "index": i, "config": name, "nll": v} for name, vs in values.items()
            for i, v in enumerate(vs)]


def test_an_ablation_is_also_compared_with_its_default_configuration():
    from vps.evaluation.digest import finding
    from vps.evaluation.report import render_markdown
    from vps.evaluation.summary import summarize_run

    base = [1.0, 1.2, 0.9, 1.1, 1.3, 1.0]
    default = [b - 0.05 for b in base]
    values = {"baseline": base, "default": default, "better": [d - 0.1 for d in default],
              "same": list(default)}
    configs = {"baseline": {"method": "base"}, **{n: {"method": "vps"} for n in values if n != "baseline"}}
    settings = {"configs": configs,
                "data": {"n_items": 6}, "generate": False, "nll": True}
    summary = summarize_run(settings, _nll_rows(values))
    entry = {e["name"]: e for e in summary["configs"]}
    assert summary["reference"] == "default"
    assert entry["better"]["vs_reference"]["nll_diff"] == pytest.approx(-0.1)
    assert entry["better"]["vs_reference"]["nll_diff_ci"][1] < 0
    assert entry["same"]["vs_reference"]["nll_diff"] == pytest.approx(0.0)
    assert entry["better"]["vs_baseline"]["nll_diff"] == pytest.approx(-0.15)
    # neither the baseline nor the reference is compared with the reference
    assert entry["baseline"]["vs_reference"] is None and entry["default"]["vs_reference"] is None
    assert entry["default"]["vs_baseline"]["nll_diff"] == pytest.approx(-0.05)
    report = render_markdown(summary)
    assert "## Difference vs `default`" in report and "| `better` | 6 | -0.1000 |" in report
    assert "vs `default` -0.1000" in finding(entry["better"], 6, "default")
    assert "(lower)" in finding(entry["better"], 6, "default")
    assert "(no significant difference)" in finding(entry["same"], 6, "default")

    # a run without a `default` configuration has no reference
    plain = summarize_run({**settings, "configs": {"baseline": {"method": "base"}, "x": {"method": "vps"}}},
                          _nll_rows({"baseline": base, "x": default}))
    assert plain["reference"] is None and "Difference vs" not in render_markdown(plain)


def test_report_names_each_patched_configuration():
    from vps import VPSConfig
    from vps.evaluation.report import configuration_lines

    lines = configuration_lines({"b": {"config": None}, "v": {"config": VPSConfig(gamma=0.3).to_dict()},
                                 "d": {"config": {k: v for k, v in VPSConfig().to_dict().items() if k != "damping"}}})
    assert lines[0].startswith("- **VPS configuration** of each patched method")
    assert lines[1:] == ["  - `v`: gamma=0.3", "  - `d`: the defaults"]
    assert configuration_lines({"b": {"config": None}}) == []
