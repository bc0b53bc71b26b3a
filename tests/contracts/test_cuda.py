"""GPU behaviour; skipped where no CUDA device is present (CI has none: run on a GPU machine)."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import vps
from tests.helpers.tiny import ids, tiny_llama

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _blocking_calls(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if e.key in ("cudaStreamSynchronize", "cudaMemcpy"))


@pytest.mark.parametrize("move_after_patching", [False, True])
def test_a_patched_forward_blocks_the_host_at_most_once(move_after_patching):
    # A host-device copy per layer (a gain or a constant left on the CPU) blocks the host at every
    # layer and serialises the launches; one check per forward (the attention mask) is allowed.
    model = tiny_llama() if move_after_patching else tiny_llama().cuda()
    vps.patch(model, vps.VPSConfig())
    model.cuda()
    x = ids(2, 16).cuda()

    def forward():
        with torch.no_grad():
            model(input_ids=x, attention_mask=torch.ones_like(x))

    forward()  # the first forward may move what was left behind once
    layers = len(vps.vps_layers(model))
    assert layers > 2
    assert _blocking_calls(forward) <= 2
    assert all(layer.gain.device.type == "cuda" for layer in vps.vps_layers(model).values())
    vps.reset_state(model)
    assert _blocking_calls(forward) <= 2


def test_refinement_gains_live_on_the_gpu_and_step():
    model = vps.patch(tiny_llama().cuda(), vps.VPSConfig(gamma=0.9, adaptive_gamma=False, lbfgs_scale=1.0))
    from vps.refinement.gains import GainOptimizer

    gains = GainOptimizer(model, batch=2)
    x = ids(2, 16).cuda()
    with gains.tracking(), torch.enable_grad():
        out = model(input_ids=x, attention_mask=torch.ones_like(x)).logits
        out.float().pow(2).mean().backward()
    gains.step()
    layer = next(iter(vps.vps_layers(model).values()))
    assert layer.gain.device.type == "cuda" and layer.gain.shape == (2,)
    assert gains.gains().ne(1.0).any()


def test_a_checkpointed_surrogate_step_on_the_gpu_equals_the_kept_one():
    """`checkpoint_activations` on CUDA: the recompute (non-reentrant checkpoint, VPS layers replaying their plans)
    gives the step that keeps its activations (within GPU rounding)."""
    from tests.helpers.tiny_eval import tiny_tokenizer
    from vps.prompting import chat_prompt
    from vps.refinement import loop
    from vps.refinement.gains import GainOptimizer

    tok = tiny_tokenizer()
    prompts = [chat_prompt(tok, q, system=None) for q in ("What is 12 - 5 + 2?", "What is 3 + 4?")]
    targets = [tok(f"#### {a}", add_special_tokens=False, return_tensors="pt")["input_ids"][0] for a in (9, 7)]
    got = []
    for checkpoint in (False, True):
        base = tiny_llama()
        base.resize_token_embeddings(len(tok))
        model = vps.patch(base.cuda(), vps.VPSConfig(topk=8, gamma=0.9, adaptive_gamma=False, lbfgs_scale=1.0))
        gains = GainOptimizer(model, batch=2)
        infos = loop._surrogate_step(model, tok, prompts, targets, gains, torch.device("cuda"), checkpoint)
        got.append(([i["loss"] for i in infos], gains.gains()))
    (loss_k, gains_k), (loss_c, gains_c) = got
    assert gains_k.ne(1.0).any()
    assert loss_c == pytest.approx(loss_k, rel=1e-5) and torch.allclose(gains_c, gains_k, rtol=1e-5, atol=1e-7)
