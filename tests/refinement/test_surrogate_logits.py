"""The surrogate step forms logits only from the earliest scored position on, and that changes nothing it
computes: losses, the gains' gradient and their step are bit-identical to scoring from all logits."""

import pytest
import torch

import vps
from tests.helpers.tiny import TINY_MODELS
from tests.helpers.tiny_eval import RecordingGains, tiny_tokenizer
from vps.prompting import chat_prompt
from vps.refinement import loop

QUESTIONS = ("What is 12 - 5 + 2?", "What is 3 + 4?", "Is 19 more than 7?")


def surrogate(arch, tok, targets, keep_logits, monkeypatch):
    model = TINY_MODELS[arch]()
    model.resize_token_embeddings(len(tok))
    # A fixed, large gamma and step scale make the tiny model's gain steps visible in float32.
    model = vps.patch(model, vps.VPSConfig(topk=8, gamma=0.9, adaptive_gamma=False, lbfgs_scale=1.0))
    monkeypatch.setattr(loop, "_keeps_logits", lambda m: keep_logits)
    widths = []
    model.register_forward_hook(lambda m, a, out: widths.append(out.logits.shape[1]))
    prompts = [chat_prompt(tok, q, system=None) for q in QUESTIONS]
    gains = RecordingGains(model, batch=len(prompts))
    steps = []
    for _ in range(2):  # the second step goes through the L-BFGS memory the first filled
        infos = loop._surrogate_step(model, tok, prompts, targets, gains, torch.device("cpu"))
        steps.append(([i["loss"] for i in infos], gains.recorded, gains.gains()))
    return steps, widths


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
def test_kept_logits_change_no_loss_gradient_or_step(arch, monkeypatch):
    tok = tiny_tokenizer()
    targets = [tok(f"#### {a}", add_special_tokens=False, return_tensors="pt")["input_ids"][0] for a in (9, 7, 1)]
    kept, kept_widths = surrogate(arch, tok, targets, True, monkeypatch)
    full, full_widths = surrogate(arch, tok, targets, False, monkeypatch)
    assert max(kept_widths) < min(full_widths), "only the positions from the earliest target on"
    for (loss_k, grad_k, gains_k), (loss_f, grad_f, gains_f) in zip(kept, full, strict=True):
        assert grad_f.abs().sum() > 0 and not torch.equal(gains_f, torch.ones_like(gains_f))
        assert loss_k == loss_f and torch.equal(grad_k, grad_f) and torch.equal(gains_k, gains_f)


def test_a_prompt_target_scores_every_position(monkeypatch):
    tok = tiny_tokenizer()
    targets = [None, tok("#### 7", add_special_tokens=False, return_tensors="pt")["input_ids"][0], None]
    _, widths = surrogate("llama", tok, targets, True, monkeypatch)
    prompts = [chat_prompt(tok, q, system=None) for q in QUESTIONS]
    width = max(len(tok(p, add_special_tokens=False)["input_ids"]) + (0 if t is None else t.numel())
                for p, t in zip(prompts, targets, strict=True))
    assert widths == [width, width]


def test_only_a_forward_that_names_logits_to_keep_is_given_it():
    assert loop._keeps_logits(TINY_MODELS["llama"]())

    class NoKeep(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, **kwargs):
            raise AssertionError("not called")

    assert not loop._keeps_logits(NoKeep())
