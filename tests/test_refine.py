"""The refinement loop on a tiny model with a character tokenizer (and briefly on the real model)."""

import json

import pytest
import torch

import vps
from tiny_eval import tiny_model, tiny_tokenizer
from vps.prompting import chat_prompt
from vps.refine import refine


@pytest.fixture
def setup():
    tok = tiny_tokenizer()
    model = vps.patch(tiny_model(tok), vps.VPSConfig(topk=8))
    return model, tok, chat_prompt(tok, "What is 3 + 4?", system=None)


def test_self_mode_trace_and_adaptation(setup):
    _, tok, prompt = setup
    # A fixed, large gamma and step scale make the tiny model's gain steps visible in float32.
    model = vps.patch(tiny_model(tok), vps.VPSConfig(topk=8, gamma=0.9, adaptive_gamma=False, lbfgs_scale=1.0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = refine(model, tok, prompt, iters=3, k_samples=3, max_new_tokens=8, seed=1)
    assert not result.oracle and result.mode == "self"
    assert len(result.trace) == 3 and 0 <= result.best_index < 3
    first, later = result.trace[0], result.trace[1:]
    assert first["policy"]["builders"] == {"sk": first["policy"]["layers"]}
    for row in later:
        assert row["policy"]["builders"].get("sc", 0) > 0, "a captured gradient switches Hybrid to SC"
        assert row["surrogate"]["lbfgs_pairs"] >= 0 and "improved" in row
        assert row["surrogate"]["target"] in ("answer", "prompt")
    assert result.trace[2]["mean_gain"] != 1.0, "the gains moved"
    assert result.trace[1]["policy"]["sigma"] != first["policy"]["sigma"], "entropy feedback changes sigma"
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)
    assert len(result.samples) == 3
    json.dumps(result.to_dict())  # the trace is JSON-ready


def test_oracle_mode_is_labelled_and_uses_gold(setup):
    model, tok, prompt = setup
    result = refine(model, tok, prompt, gold="#### 7", mode="oracle", iters=2, k_samples=0, max_new_tokens=6)
    assert result.oracle and result.reference == "7"
    assert all(row["oracle"] for row in result.trace)
    assert result.trace[1]["surrogate"]["target"] == "answer"
    assert result.to_dict()["oracle"] is True


def test_without_reference_the_surrogate_uses_the_prompt(setup):
    model, tok, prompt = setup
    result = refine(model, tok, prompt, iters=2, k_samples=0, max_new_tokens=4)
    assert result.reference is None
    assert result.trace[1]["surrogate"]["target"] == "prompt"


@pytest.mark.parametrize("kwargs,match", [
    (dict(mode="oracle"), "gold"), (dict(mode="guess"), "mode"), (dict(iters=0), "iters"),
    (dict(k_samples=-1), "k_samples"),
])
def test_bad_arguments(setup, kwargs, match):
    model, tok, prompt = setup
    with pytest.raises(ValueError, match=match):
        refine(model, tok, prompt, **kwargs)


def test_unpatched_model_is_refused():
    with pytest.raises(ValueError, match="patched"):
        refine(tiny_model(tiny_tokenizer()), tiny_tokenizer(), "q")
