"""Fallbacks to the base output, counted per item: `vps.tracing.count_fallbacks` and the evaluation rows."""

from __future__ import annotations

import json

import pytest
import torch

import vps
from tests.helpers.tiny import TINY_MODELS, ids
from tests.helpers.tiny_eval import settings_for, tiny_tokenizer, write_data
from vps import builders as builders_mod
from vps.evaluation import MethodSpec, RunDir, run_evaluation
from vps.evaluation.report import write_report
from vps.tracing import count_fallbacks

SC = dict(topk=8, gamma=0.8, adaptive_gamma=False, tau=10.0, builder="sc")


def _fail_sequence(monkeypatch, sequence: int | None) -> None:
    """SC selections fail (ok False) for one sequence of every batch, or for none (None)."""
    build = builders_mod.SCBuilder.build

    def broken(self, inp):
        sel = build(self, inp)
        ok = torch.ones(sel.coef.shape[0], dtype=torch.bool)
        if sequence is not None:
            ok[sequence] = False
        return builders_mod.Selection(sel.in_idx, sel.out_idx, sel.coef, ok, sel.builder)

    monkeypatch.setattr(builders_mod.SCBuilder, "build", broken)


def test_each_sequence_counts_its_own_fallbacks(monkeypatch, one_thread):
    _fail_sequence(monkeypatch, 1)
    model = vps.patch(TINY_MODELS["llama"](), vps.VPSConfig(**SC))
    n_layers = len(vps.vps_layers(model))
    x = ids(3, 7)
    with torch.no_grad(), count_fallbacks(model, 3) as count:
        model(input_ids=x)
        model(input_ids=x)  # each forward that builds plans counts again
    assert count.per_sequence == [0, 2 * n_layers, 0]
    with pytest.raises(ValueError, match="opened for 2 sequences, and a forward inside it ran 3"):
        with torch.no_grad(), count_fallbacks(model, 2):
            model(input_ids=x)
    with count_fallbacks(model, 1), pytest.raises(RuntimeError, match="do not nest"):
        with count_fallbacks(model, 1):
            pass


def test_batch_scope_charges_a_shared_failure_to_every_sequence(monkeypatch, one_thread):
    _fail_sequence(monkeypatch, 0)
    model = vps.patch(TINY_MODELS["llama"](), vps.VPSConfig(**SC, scope="batch"))
    with torch.no_grad(), count_fallbacks(model, 2) as count:
        model(input_ids=ids(2, 5))
    n_layers = len(vps.vps_layers(model))
    assert count.per_sequence == [n_layers, n_layers]


@pytest.mark.parametrize("failing", [None, 0])
def test_eval_rows_carry_fallbacks_and_the_report_shows_the_share(tmp_path, model, monkeypatch, failing):
    _fail_sequence(monkeypatch, failing)
    items, settings = settings_for(write_data(tmp_path / "d.jsonl"), nll=True)
    specs = [MethodSpec("base", "base"), MethodSpec("vps", "vps", vps.VPSConfig(**SC))]
    out = tmp_path / "run"
    run_evaluation(model, tiny_tokenizer(), items, specs, out, settings, batch_size=2, progress=False,
                   log=lambda _m: None)
    write_report(out)
    rows = RunDir(out).read_rows()
    assert all("fallbacks" not in r for r in rows if r["config"] == "base")
    counts = [r["fallbacks"] for r in rows if r["config"] == "vps"]
    summary = json.loads((out / "summary.json").read_text())
    fb = next(c for c in summary["configs"] if c["name"] == "vps")["fallbacks"]
    report = (out / "report.md").read_text()
    if failing is None:
        assert counts == [0] * len(items) and fb["items_with_any"] == 0
    else:
        # The first item of each batch of 2 (5 items: 3 batches) fell back in every layer, in generation and in
        # the NLL pass's prefill.
        assert sum(n > 0 for n in counts) == 3 and fb["items_with_any"] == 3 and fb["total"] == sum(counts)
        assert "- **Fallbacks**: `vps`: 3 of 5 items (60.0%) had at least one layer fall back" in report


def test_a_trial_counts_the_fallbacks_of_the_items_it_scores(monkeypatch, one_thread):
    from tests.helpers.tiny_eval import QUESTIONS, tiny_model
    from vps.tuning.objective import ScoringTask, score_trial

    _fail_sequence(monkeypatch, 0)
    tok = tiny_tokenizer()
    model = tiny_model(tok)
    ids_ = [f"q{i}" for i in range(len(QUESTIONS))]
    task = ScoringTask.build(ids_, [q for q, _ in QUESTIONS], [a for _, a in QUESTIONS], tok, batch_size=2)
    base = dict.fromkeys(ids_, 1.0)
    score = score_trial(model, tok, vps.VPSConfig(**SC), task, base)
    # the first item of each of the 3 batches failed in every layer; the others never did
    assert score.fallback_summary() == {"items": 5, "items_with_any": 3, "total": sum(score.fallbacks.values())}
    assert sorted(score.fallbacks[task.ids[b[0]]] > 0 for b in task.batches) == [True] * 3
