"""A few checks on the bundled SmolLM2-135M-Instruct (cached after the first run; runs in CI)."""

import pytest
import torch

import vps
from vps.prompting import chat_prompt
from vps.refinement.loop import refine

pytestmark = pytest.mark.real_model

QUESTION = ("Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for "
            "her friends every day with four. She sells the remainder at the farmers' market daily for $2 per fresh "
            "duck egg. How much in dollars does she make every day at the farmers' market?")


@pytest.fixture(scope="module")
def loaded():
    model, tok = vps.load_model()
    return model, tok


def test_patched_real_model_invariance_and_decoding(loaded):
    model, tok = loaded
    enc = tok([chat_prompt(tok, "What is 17 * 23?")], return_tensors="pt")
    with torch.no_grad():
        base = model(**enc).logits
    vps.patch(model, vps.VPSConfig())
    try:
        with torch.no_grad():
            patched = model(**enc).logits
            with vps.disabled(model):
                assert torch.equal(model(**enc).logits, base)
        assert not torch.equal(patched, base)
        out = model.generate(**enc, max_new_tokens=12, do_sample=False)
        with vps.reuse_selection(model), torch.no_grad():
            again = model(out).logits[0, enc["input_ids"].shape[1] - 1:-1].argmax(-1)
        assert torch.equal(again, out[0, enc["input_ids"].shape[1]:]), "frozen decode == recompute"
        summary = vps.summarize(model)
        assert summary["layers"] == 30 * 7 and summary["fallbacks"] == 0
    finally:
        vps.unpatch(model)
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, base)


@pytest.mark.parametrize("mode", ["self", "oracle"])
def test_short_refine_on_gsm8k_question(loaded, mode):
    model, tok = loaded
    vps.patch(model, vps.VPSConfig())
    try:
        result = refine(model, tok, chat_prompt(tok, QUESTION), gold="18" if mode == "oracle" else None,
                        mode=mode, iters=2, k_samples=2 if mode == "self" else 0, max_new_tokens=16)
    finally:
        vps.unpatch(model)
    assert result.oracle == (mode == "oracle")
    first, second = result.trace
    assert first["policy"]["builders"] == {"sk": 210}
    assert second["policy"]["builders"].get("sc", 0) > 0
    assert second["policy"]["sigma"] != first["policy"]["sigma"]
    assert second["mean_gain"] != 1.0
