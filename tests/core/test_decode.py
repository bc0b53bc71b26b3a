"""KV-cached decoding: frozen selectors equal a full recompute; dynamic mode rebuilds per step."""

import torch

import vps
from tests.helpers.tiny import ids, tiny_llama, tiny_qwen2
from vps.context import next_token_entropy
from vps.kv_cache import cache_argument, output_cache


def greedy_recompute(model, prompt, steps):
    seq = prompt
    with torch.no_grad(), vps.reuse_selection(model):
        for _ in range(steps):
            nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    return seq


def test_frozen_cached_generate_equals_full_recompute():
    for make in (tiny_llama, tiny_qwen2):
        model = vps.patch(make(), vps.VPSConfig(topk=8, gamma=0.8, adaptive_gamma=False, tau=10.0))
        prompt = ids(1, 7)
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20,
                             do_sample=False, pad_token_id=0)
        assert torch.equal(greedy_recompute(model, prompt, 20), out)
        with vps.disabled(model):
            base = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20,
                                  do_sample=False, pad_token_id=0)
        assert not torch.equal(base, out), "the perturbation should change some greedy tokens"


def step_selections(model, prompt, steps):
    """Greedy decode with the KV cache, recording one layer's input selection after each forward."""
    layer = vps.vps_layers(model)["model.layers.1.mlp.down_proj"]
    out = model(prompt, use_cache=True)
    seen = [layer.plan.selection.in_idx.clone()]
    entropies = [(next_token_entropy(out.logits), layer.plan.decision.entropy)]
    for _ in range(steps):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        prev_logits = out.logits
        out = model(nxt, use_cache=True, **{cache_argument(model): output_cache(out)})
        seen.append(layer.plan.selection.in_idx.clone())
        entropies.append((next_token_entropy(prev_logits), layer.plan.decision.entropy))
    return seen, entropies


def test_dynamic_mode_rebuilds_each_step_and_sees_previous_entropy():
    model = vps.patch(tiny_llama(), vps.VPSConfig(topk=8, decode_mode="dynamic"))
    with torch.no_grad():
        seen, entropies = step_selections(model, ids(1, 6), 8)
    assert len({tuple(s.flatten().tolist()) for s in seen}) > 1
    assert entropies[0][1] is None, "a prefill starts clean"
    for measured, used in entropies[1:]:
        torch.testing.assert_close(used, measured)


def test_frozen_mode_keeps_prefill_selection():
    model = vps.patch(tiny_llama(), vps.VPSConfig(topk=8))
    with torch.no_grad():
        seen, _ = step_selections(model, ids(1, 6), 5)
    assert all(torch.equal(s, seen[0]) for s in seen)


def test_prefill_never_depends_on_earlier_calls():
    model = vps.patch(tiny_llama(), vps.VPSConfig(topk=8, decode_mode="dynamic"))
    x = ids(1, 6)
    with torch.no_grad():
        first = model(x).logits
        model(ids(1, 9, seed=5))  # an unrelated call leaves an entropy behind
        assert torch.equal(model(x).logits, first)


def test_a_plan_for_one_sequence_is_not_broadcast_to_a_batch():
    model = vps.patch(tiny_llama(), vps.VPSConfig(topk=8))
    layer = vps.vps_layers(model)["model.layers.1.mlp.down_proj"]
    with torch.no_grad():
        model(ids(1, 5))
        with vps.reuse_selection(model):
            model(ids(3, 5))
    assert layer.plan.batch == 3, "a mismatched plan is rebuilt, not shared"
