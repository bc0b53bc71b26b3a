"""Majority-vote baselines maj@k and vps-maj@k: the vote and its tie rule, sample reuse, specs, the CLI."""

from __future__ import annotations

import pytest

import vps
from tests.helpers.tiny_eval import settings_for, tiny_tokenizer, write_data
from vps.evaluation import GridError, MethodSpec, RunDir, parse_grid, run_evaluation
from vps.evaluation.methods.vote import vote_batch
from vps.refinement.samples import DrawnSamples
from vps.verify import extract_answer

TOK = tiny_tokenizer()


def fake_draws(texts_per_item):
    """A draw_samples stand-in returning the given completions for the batch's items, in order."""
    def draw(model, tokenizer, prompts, config, *args, **kwargs):
        k = config.k_samples
        out = []
        for texts in texts_per_item[:len(prompts)]:
            assert len(texts) == k
            out.append(DrawnSamples([extract_answer(t) for t in texts], 10 * k, 0.5, texts=list(texts)))
        return "fp", out
    return draw


@pytest.mark.parametrize("name, texts, pred, chosen", [
    ("clear majority", ["#### 18", "#### 7", "#### 18", "#### 18"], "18", 0),
    ("tie goes to the answer sampled first", ["#### 7", "#### 18", "#### 18", "#### 7"], "7", 0),
    ("tie, first sample has no answer", ["no idea", "#### 18", "#### 7", "#### 7", "#### 18"], "18", 1),
    ("equal numbers in other forms agree", ["#### 1,000", "#### 3", "The answer is 1000.", "#### 3.0"], "1,000", 0),
    ("a lone answer wins over none", ["nothing", "still nothing", "#### 4"], "4", 2),
    ("no extractable answer at all", ["nothing", "nothing either"], None, 0),
])
def test_the_vote_and_its_tie_rule(name, texts, pred, chosen, tmp_path, model, monkeypatch):
    import importlib

    # vps.refine is rebound to the function in vps/__init__; the module itself is in sys.modules
    monkeypatch.setattr(importlib.import_module("vps.refinement.loop"), "draw_samples", fake_draws([texts]))
    items, settings = settings_for(write_data(tmp_path / "d.jsonl"), nll=False)
    spec = MethodSpec(f"maj@{len(texts)}", "maj", votes=len(texts))
    rows = vote_batch(model, TOK, items[:1], spec, {items[0].id: "p"}, settings, None)
    (row,) = rows
    assert row["pred"] == pred, name
    assert row["output"] == texts[chosen]
    assert row["vote"]["k"] == len(texts) and row["vote"]["answers"] == [
        None if a is None else a.text for a in map(extract_answer, texts)]
    assert row["vote"]["tie_rule"].startswith("most votes")
    assert row["tokens"] == 10 * len(texts) and row["seconds"] == 0.5
    if pred is None:
        assert row["correct"] is False and row["vote"]["winner_votes"] == 0


def test_vps_maj_votes_over_exactly_the_samples_refinement_drew(tmp_path, model):
    items, settings = settings_for(write_data(tmp_path / "d.jsonl"), nll=False, max_new_tokens=3, refine_iters=2,
                                   refine_k_samples=3)
    specs = [MethodSpec("refine-self", "refine-self"), MethodSpec("vps-maj@3", "vps-maj", votes=3),
             MethodSpec("maj@3", "maj", votes=3)]
    out = tmp_path / "out"
    run_evaluation(model, TOK, items[:2], specs, out, settings, batch_size=2, progress=False, log=lambda _m: None)
    by = {(r["config"], r["id"]): r for r in RunDir(out).read_rows()}
    for it in items[:2]:
        refine, vote, base = by["refine-self", it.id], by["vps-maj@3", it.id], by["maj@3", it.id]
        assert vote["vote"]["samples_reused"] and not refine["refine"]["samples_reused"]
        assert vote["vote"]["sample_record"] == refine["refine"]["sample_record"]
        assert len(vote["vote"]["sample_record"]["texts"]) == 3
        assert vote["seconds"] == refine["refine"]["sample_record"]["seconds"] > 0
        assert vote["tokens"] == refine["refine"]["sample_record"]["tokens"]
        # the unpatched model's samples are its own
        assert not base["vote"]["samples_reused"] and base["method"] == "maj" and not base["oracle"]
        assert base["vote"]["sample_record"]["settings"] != vote["vote"]["sample_record"]["settings"]
    assert not vps.is_patched(model)


def test_a_resumed_vote_reuses_the_recorded_samples(tmp_path, model):
    items, settings = settings_for(write_data(tmp_path / "d.jsonl"), nll=False, max_new_tokens=3, refine_iters=1,
                                   refine_k_samples=2)
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    refine, vote = MethodSpec("refine-self", "refine-self"), MethodSpec("vps-maj@2", "vps-maj", votes=2)
    run_evaluation(model, TOK, items[:2], [refine], out, settings, batch_size=2, progress=False, log=lambda _m: None)
    run_evaluation(model, TOK, items[:2], [refine, vote], out, settings, batch_size=2, progress=False,
                   log=lambda _m: None)
    run_evaluation(model, TOK, items[:2], [vote], fresh, settings, batch_size=2, progress=False, log=lambda _m: None)
    resumed = {r["id"]: r for r in RunDir(out).read_rows() if r["config"] == "vps-maj@2"}
    alone = {r["id"]: r for r in RunDir(fresh).read_rows()}
    for it in items[:2]:
        assert resumed[it.id]["vote"]["samples_reused"] and not alone[it.id]["vote"]["samples_reused"]
        assert resumed[it.id]["output"] == alone[it.id]["output"]
        assert resumed[it.id]["vote"]["answers"] == alone[it.id]["vote"]["answers"]


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "maj"}, "needs votes"),
    ({"method": "vps-maj", "votes": 0}, "needs votes"),
    ({"method": "vps", "votes": 3}, "only maj and vps-maj take votes"),
    ({"method": "maj", "votes": 2, "config": vps.VPSConfig()}, "takes no VPS config"),
])
def test_bad_vote_specs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MethodSpec("x", **kwargs)


def test_vote_specs_round_trip_and_in_grids():
    spec = MethodSpec("vps-maj@4", "vps-maj", vps.VPSConfig(gamma=0.3), votes=4)
    assert MethodSpec.from_dict(spec.name, spec.to_dict()) == spec
    assert "votes" not in MethodSpec("vps", "vps").to_dict()
    specs = parse_grid({"m": {"method": "maj", "votes": 4}, "vm": {"method": "vps-maj", "votes": 4, "gamma": 0.3}})
    assert [(s.method, s.votes, s.patched) for s in specs] == [("maj", 4, False), ("vps-maj", 4, True)]
    for bad in ({"m": {"method": "maj"}}, {"m": {"method": "vps", "votes": 2}}, {"m": {"method": "maj", "votes": 2,
                                                                                       "gamma": 0.1}}):
        with pytest.raises(GridError, match="configuration 'm'"):
            parse_grid(bad)


@pytest.mark.parametrize("text, expected", [
    ("base,maj@4,vps-maj@4", [("base", None), ("maj", 4), ("vps-maj", 4)]),
    ("refine-self,vps-maj@8", [("refine-self", None), ("vps-maj", 8)]),
])
def test_cli_methods_with_votes(text, expected):
    from vps import cli
    from vps.commands.eval import parse_methods

    args = cli.build_parser().parse_args(["eval", "--methods", text, "--out", "unused"])
    specs = parse_methods(args.methods, args)
    assert [(s.method, s.votes) for s in specs] == expected
    assert [s.name for s in specs] == text.split(",")


@pytest.mark.parametrize("methods", ["maj", "vps-maj@", "maj@four", "vps@3", "base,maj@2,maj@2"])
def test_cli_refuses_bad_vote_methods_before_loading(tmp_path, capsys, methods):
    from vps import cli

    data = write_data(tmp_path / "d.jsonl")
    rc = cli.main(["eval", "--model", str(tmp_path / "none"), "--data", str(data), "--out", str(tmp_path / "o"),
                   "--methods", methods])
    assert rc == 2 and "--methods" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_large_batch_of_samples_is_drawn_in_chunks_with_the_same_draws(model, monkeypatch):
    """Memory does not grow with batch x k: a batch whose rows exceed MAX_SAMPLE_ROWS is split over several
    generate calls, and since every prompt draws from its own stream the samples are the ones one call draws."""
    import importlib

    from vps.refinement import RefineConfig

    loop = importlib.import_module("vps.refinement.loop")
    tok = tiny_tokenizer()
    prompts = ["Tom has 3 apples.", "Each of 5 kids has 2 toys.", "A box holds 4 pens."]
    config = RefineConfig(k_samples=2, max_new_tokens=5, seed=3)
    _, whole = loop.draw_samples(model, tok, prompts, config)
    calls = []
    decode = loop._decode
    monkeypatch.setattr(loop, "_decode",
                        lambda m, t, rows, *a, **k: calls.append(len(rows)) or decode(m, t, rows, *a, **k))
    monkeypatch.setattr(loop, "MAX_SAMPLE_ROWS", 2)
    _, chunked = loop.draw_samples(model, tok, prompts, config)
    assert calls == [2, 2, 2]  # one prompt's k = 2 rows per call, not all 6 at once
    assert [d.texts for d in chunked] == [d.texts for d in whole]
    assert len({t for d in whole for t in d.texts}) > 1  # the samples differ, so equality shows the same draws


@pytest.mark.parametrize("votes", [0, 65, 10**6])
def test_votes_are_bounded(votes):
    with pytest.raises(ValueError, match=r"needs votes \(k\) in \[1, 64\]"):
        MethodSpec(f"maj@{votes}", "maj", votes=votes)
