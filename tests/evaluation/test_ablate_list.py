"""Grid entries that cannot differ from another for their method: which ones (derived from the configuration
fields and the method), how ``vps ablate --list`` marks them, and that a run skips them unless asked while a
run directory that holds them still resumes with them."""

from __future__ import annotations

import json

import pytest

import vps
from tests.helpers.tiny_eval import SYSTEM, tiny_model, tiny_tokenizer, write_data
from vps import cli
from vps.evaluation import RunDir
from vps.evaluation.ablation import acting_config, equivalent_entries, load_grid
from vps.evaluation.methods import MethodSpec

TOK = tiny_tokenizer()
pytestmark = pytest.mark.usefixtures("one_thread")

# The stored run results/smollm2-ablation-nll-n250 (the seed grid, NLL only) has exactly these entries' rows equal
# to default's, item for item.
SEED_EQUIVALENT = {"no_lbfgs", "order_1", "builder_sk", "builder_hybrid", "topk_16", "topk_64"}


def test_the_seed_grid_entries_that_reproduce_default_without_refinement():
    same = equivalent_entries(load_grid())
    assert set(same) == SEED_EQUIVALENT
    assert all(eq.same_as == "default" for eq in same.values())
    assert same["no_lbfgs"].why.startswith("lbfgs_enabled acts only in refinement")
    assert same["builder_sk"].why.startswith("builders hybrid and sk both run SK without a gradient")
    assert same["topk_16"].why.startswith("topk does not act under SK")
    assert same["order_1"].why == "the same configuration"


def test_the_rule_follows_the_method_and_the_builder_not_the_names():
    cfg = vps.VPSConfig()
    refine = [MethodSpec("a", "refine-self", cfg), MethodSpec("b", "refine-self", cfg.replace(lbfgs_enabled=False)),
              MethodSpec("c", "refine-self", cfg.replace(builder="sk")), MethodSpec("d", "refine-self", cfg)]
    assert set(equivalent_entries(refine)) == {"d"}, "refinement captures gradients: every field acts"
    sc = [MethodSpec("sc", "vps", cfg.replace(builder="sc")),
          MethodSpec("sc16", "vps", cfg.replace(builder="sc", topk=16)),
          MethodSpec("sc_a", "vps", cfg.replace(builder="sc", alpha=0.1))]
    assert equivalent_entries(sc) == {}, "SC reads top-k and alpha without a gradient too"
    other = [MethodSpec("x", "vps", cfg.replace(history_step=0.3, grad_eta=0.5, lbfgs_m=3)),
             MethodSpec("y", "vps", cfg.replace(adaptive_topk=True, topk_bounds=(8, 32), alpha=0.1))]
    same = equivalent_entries(other)
    assert list(same) == ["y"] and same["y"].same_as == "x", "inert fields on both sides, different values"
    votes = [MethodSpec("v4", "vps-maj", cfg, votes=4), MethodSpec("v8", "vps-maj", cfg, votes=8),
             MethodSpec("v4b", "vps-maj", cfg.replace(lbfgs_enabled=False), votes=4), MethodSpec("vps", "vps", cfg)]
    assert set(equivalent_entries(votes)) == {"v4b"}, "same method and the same number of votes"
    assert equivalent_entries([MethodSpec("b1", "base"), MethodSpec("b2", "base")]) == {}, "the baseline always runs"
    assert acting_config(MethodSpec("b", "base")) is None
    assert acting_config(MethodSpec("v", "vps", cfg))["builder"] == "sk"
    assert acting_config(MethodSpec("r", "refine-self", cfg))["builder"] == "hybrid"


GRID = {"baseline": {"method": "base"}, "default": {}, "g3": {"gamma": 0.3}, "no_lbfgs": {"lbfgs_enabled": False},
        "topk_16": {"topk": 16}}


@pytest.fixture
def grid(tmp_path):
    path = tmp_path / "g.json"
    path.write_text(json.dumps(GRID))
    return path


def test_list_marks_them_and_says_what_runs(grid, capsys):
    assert cli.main(["ablate", "--list", "--grid", str(grid)]) == 0
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert list(lines) == list(GRID), "every entry is listed"
    assert "[" not in lines["default"] and "[" not in lines["g3"]
    assert lines["no_lbfgs"].endswith("[= default for vps: lbfgs_enabled acts only in refinement (L-BFGS "
                                      "preconditions refinement's gain steps); skipped]")
    assert lines["topk_16"].endswith("; skipped]")
    assert cli.main(["ablate", "--list", "--grid", str(grid), "--only", "default,topk_16"]) == 0
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert list(lines) == ["baseline", "default", "topk_16"] and lines["topk_16"].endswith("runs: named by --only]")
    assert cli.main(["ablate", "--list", "--grid", str(grid), "--include-equivalent"]) == 0
    assert capsys.readouterr().out.count("runs: --include-equivalent]") == 2


def _configs(out) -> list[str]:
    return sorted({r["config"] for r in RunDir(out).read_rows()})


def test_a_run_skips_them_unless_asked_and_a_run_that_holds_them_resumes_with_them(tmp_path, grid, monkeypatch, capsys):
    model = tiny_model(TOK)
    monkeypatch.setattr("vps.commands.eval.load", lambda args: (model, TOK))
    data = write_data(tmp_path / "d.jsonl")

    def ablate(out, *extra):
        return cli.main(["ablate", "--grid", str(grid), "--data", str(data), "--nll-only", "--out", str(out),
                         "--no-progress", "--limit", "2", "--batch-size", "2", "--system", SYSTEM, *extra])

    assert ablate(tmp_path / "skip") == 0
    err = capsys.readouterr().err
    assert ("skipping 2 configuration(s) that cannot differ from an earlier one for their method: "
            "no_lbfgs (= default), topk_16 (= default); --list says why") in err
    assert _configs(tmp_path / "skip") == ["baseline", "default", "g3"]

    assert ablate(tmp_path / "all", "--include-equivalent") == 0
    assert "skipping" not in capsys.readouterr().err
    rows = {(r["id"], r["config"]): r["nll"] for r in RunDir(tmp_path / "all").read_rows()}
    assert {c for _, c in rows} == set(GRID)
    for (item, config), nll in rows.items():
        if config in ("no_lbfgs", "topk_16"):
            assert nll == rows[(item, "default")], "what the rule says cannot differ does not"

    # the run directory holds them: a rerun without the flag resumes every configuration and reports as before
    before = (tmp_path / "all" / "report.md").read_text()
    assert ablate(tmp_path / "all") == 0
    assert "skipping" not in capsys.readouterr().err
    assert (tmp_path / "all" / "report.md").read_text() == before

    assert ablate(tmp_path / "only", "--only", "no_lbfgs") == 0
    assert _configs(tmp_path / "only") == ["baseline", "no_lbfgs"], "named, it runs (nothing it equals runs here)"
