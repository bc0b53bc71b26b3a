"""Activation checkpointing of the surrogate step (`vps.refinement.checkpointing`): the blocks' activations are
recomputed in the backward instead of kept, and nothing the step computes changes."""

import pytest
import torch

import vps
from tests.helpers.tiny import TINY_MODELS
from tests.helpers.tiny_eval import RecordingGains, tiny_model, tiny_tokenizer
from vps.patching import get_context
from vps.prompting import chat_prompt
from vps.refinement import loop
from vps.refinement.checkpointing import checkpointed_blocks, decoder_blocks

QUESTIONS = ("What is 12 - 5 + 2?", "What is 3 + 4?", "Is 19 more than 7?")


def steps(arch, tok, checkpoint):
    """Two surrogate steps (the second plans SC from the gradient the first captured and steps through the
    L-BFGS memory): per step the losses, the gains' gradient, the gains, every layer's captured gradient,
    the plans made and fallbacks counted; then the bytes the forwards saved for backward outside checkpointed
    blocks and the number of patched-layer forwards."""
    model = TINY_MODELS[arch]()
    model.resize_token_embeddings(len(tok))
    model = vps.patch(model, vps.VPSConfig(topk=8, gamma=0.9, adaptive_gamma=False, lbfgs_scale=1.0))
    prompts = [chat_prompt(tok, q, system=None) for q in QUESTIONS]
    targets = [tok(f"#### {a}", add_special_tokens=False, return_tensors="pt")["input_ids"][0] for a in (9, 7, 1)]
    calls = []  # forwards of the patched layers: a recomputed block calls its layers again
    for layer in vps.vps_layers(model).values():
        layer.register_forward_pre_hook(lambda m, a: calls.append(m))
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    gains = RecordingGains(model, batch=len(prompts))
    ctx, out = get_context(model), []
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for _ in range(2):
            with vps.count_fallbacks(model, len(prompts)) as fallbacks:
                infos = loop._surrogate_step(model, tok, prompts, targets, gains, torch.device("cpu"), checkpoint)
                plans = len(ctx.fallback_flags)
            layers = vps.vps_layers(model).values()
            out.append(([i["loss"] for i in infos], gains.recorded, gains.gains(),
                        [layer.grad_mean for layer in layers], (plans, fallbacks.per_sequence)))
    return out, sum(saved), len(calls)


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
def test_checkpointed_steps_equal_kept_ones_and_keep_less(arch):
    tok = tiny_tokenizer()
    kept, kept_bytes, kept_calls = steps(arch, tok, False)
    ckpt, ckpt_bytes, ckpt_calls = steps(arch, tok, True)
    for (loss_k, grad_k, gains_k, captured_k, fb_k), (loss_c, grad_c, gains_c, captured_c, fb_c) in zip(
            kept, ckpt, strict=True):
        assert grad_k.abs().sum() > 0 and not torch.equal(gains_k, torch.ones_like(gains_k))
        assert loss_k == loss_c and torch.equal(grad_k, grad_c) and torch.equal(gains_k, gains_c)
        # the replayed plans left the gradient the backward captured for the next step, and counted nothing twice
        assert all(g is not None for g in captured_k) and fb_k[0] == len(captured_k)
        assert all(torch.equal(a, b) for a, b in zip(captured_k, captured_c, strict=True)) and fb_k == fb_c
    layers = len(kept[0][3])
    assert (kept_calls, ckpt_calls) == (2 * layers, 4 * layers), "each step's backward ran every block again"
    assert ckpt_bytes < kept_bytes / 2, (ckpt_bytes, kept_bytes)


@pytest.mark.parametrize("n_prompts", [1, 2])  # one prompt: scalar gains; two: a gain per sequence
def test_refinement_with_checkpointing_gives_the_same_trace(n_prompts):
    tok = tiny_tokenizer()
    prompts = [chat_prompt(tok, q, system=None) for q in QUESTIONS[:n_prompts]]
    traces = {}
    for checkpoint in (False, True):
        model = vps.patch(tiny_model(tok), vps.VPSConfig(topk=8, gamma=0.9, adaptive_gamma=False, lbfgs_scale=1.0))
        results = vps.refine_many(model, tok, prompts, iters=3, k_samples=3, max_new_tokens=8, seed=1,
                                  checkpoint_activations=checkpoint)
        traces[checkpoint] = [[(row["text"], row.get("surrogate"), row["mean_gain"]) for row in r.trace]
                              for r in results]
    assert any(row[1] is not None for trace in traces[False] for row in trace)
    assert traces[True] == traces[False]
    # the setting changes no number, so stored samples stay valid for it
    from vps.refinement.samples import settings_fingerprint

    config = vps.refinement.RefineConfig()
    assert (settings_fingerprint(config.replace(checkpoint_activations=True), None)
            == settings_fingerprint(config, None))


def test_the_blocks_run_as_before_afterwards_and_outside_autograd():
    model = vps.patch(TINY_MODELS["llama"](), vps.VPSConfig(topk=8))
    block = decoder_blocks(model)[0]
    with checkpointed_blocks(model):
        assert "forward" in block.__dict__
    assert "forward" not in block.__dict__

    def own(*args, **kwargs):  # a forward of the instance's own, as accelerate's device hooks install
        return type(block).forward(block, *args, **kwargs)

    block.forward = own
    with checkpointed_blocks(model):
        assert block.forward is not own
    assert block.forward is own


def test_a_model_without_checkpointable_blocks_is_refused_by_name_before_sampling(monkeypatch):
    class Plain(torch.nn.Module):
        pass

    with pytest.raises(ValueError, match="Plain has no transformers GradientCheckpointingLayer blocks"):
        decoder_blocks(Plain())
    tok = tiny_tokenizer()
    model = vps.patch(tiny_model(tok), vps.VPSConfig(topk=8))
    monkeypatch.setattr(loop, "decoder_blocks", lambda m: decoder_blocks(Plain()))
    monkeypatch.setattr(loop, "draw_samples", lambda *a, **k: pytest.fail("refused after sampling"))
    with pytest.raises(ValueError, match="Plain has no transformers GradientCheckpointingLayer blocks"):
        vps.refine_many(model, tok, ["What is 3 + 4?"], iters=2, k_samples=2, max_new_tokens=4,
                        checkpoint_activations=True)


def test_checkpointing_a_model_dispatched_with_disk_blocks(tmp_path):
    """accelerate's device hooks replace a dispatched block's forward on the instance: the checkpointed step
    wraps it (the recompute loads the offloaded weights again), gives the in-memory model's numbers, and puts
    the hook back afterwards."""
    import copy

    from accelerate import dispatch_model

    tok = tiny_tokenizer()
    base = TINY_MODELS["llama"]()
    base.resize_token_embeddings(len(tok))
    cfg = vps.VPSConfig(topk=8, gamma=0.9, adaptive_gamma=False, lbfgs_scale=1.0)
    reference = vps.patch(copy.deepcopy(base), cfg)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    dispatched = vps.patch(dispatch_model(base, device_map=device_map, main_device="cpu",
                                          offload_dir=str(tmp_path / "off")), cfg)
    hooked = decoder_blocks(dispatched)[1]
    hook_forward = hooked.__dict__["forward"]
    prompts = [chat_prompt(tok, q, system=None) for q in QUESTIONS]
    targets = [tok(f"#### {a}", add_special_tokens=False, return_tensors="pt")["input_ids"][0] for a in (9, 7, 1)]
    got = []
    for model, checkpoint in ((reference, False), (dispatched, True)):
        gains = RecordingGains(model, batch=len(prompts))
        infos = loop._surrogate_step(model, tok, prompts, targets, gains, torch.device("cpu"), checkpoint)
        got.append(([i["loss"] for i in infos], gains.recorded))
    (want_loss, want_grad), (loss, grad) = got
    assert want_grad.abs().sum() > 0
    assert loss == pytest.approx(want_loss, rel=1e-5) and torch.allclose(grad, want_grad, rtol=1e-4, atol=1e-6)
    assert hooked.__dict__["forward"] is hook_forward
    assert all(layer.weight.is_meta for name, layer in vps.vps_layers(dispatched).items()
               if name.startswith("model.layers.1."))
