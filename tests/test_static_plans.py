"""`vps.static_plans`: every new plan lands at the addresses of the last one of its shape (issue #18, item 2).

A CUDA graph captured around a frozen decode step reads its plan from the addresses it saw when it was
captured; these tests hold the property such a replay relies on, on CPU: tensors taken from a layer's
plan after one prompt hold the next prompt's plan after that prompt's prefill, and decoding is unchanged.
"""

import torch

import vps
from tiny import ids, tiny_llama, tiny_qwen2

CFG = vps.VPSConfig(topk=8, gamma=0.8, tau=10.0)
GEN = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)


def _prompt(seed):
    x = ids(2, 9, seed=seed)
    mask = torch.ones_like(x)
    mask[0, :3] = 0  # left padding, as generate() batches prompts
    return x, mask


def test_static_plans_keep_addresses_and_hold_each_prompts_plan():
    for make in (tiny_llama, tiny_qwen2):  # Qwen2: q/k/v biases, so bias_sel is held too
        fresh = vps.patch(make(), CFG)
        static = vps.static_plans(vps.patch(make(), CFG))
        captured = {}
        for seed in (1, 2, 3):
            x, mask = _prompt(seed)
            want = fresh.generate(x, attention_mask=mask, **GEN)
            got = static.generate(x, attention_mask=mask, **GEN)
            assert torch.equal(got, want), f"prompt {seed}: static plans changed the greedy tokens"
            for name, layer in vps.vps_layers(static).items():
                plan, ref = layer.plan, vps.vps_layers(fresh)[name].plan
                if seed == 1:  # what a graph captured after the first prompt would read from
                    captured[name] = (plan.out_idx, plan.q, plan.bias_sel)
                held_idx, held_q, held_bias = captured[name]
                assert held_q.data_ptr() == plan.q.data_ptr() and held_idx.data_ptr() == plan.out_idx.data_ptr()
                assert torch.equal(held_idx, ref.out_idx) and torch.equal(held_q, ref.q), (seed, name)
                assert (held_bias is None) == (ref.bias_sel is None)
                if held_bias is not None:
                    assert torch.equal(held_bias, ref.bias_sel)
        # the three prompts differ, so the held tensors really were rewritten
        assert not torch.equal(vps.vps_layers(fresh)["model.layers.0.mlp.down_proj"].plan.q,
                               _plan_after(fresh, _prompt(1))), "prompts should give different plans"


def _plan_after(model, prompt):
    with torch.no_grad():
        model(input_ids=prompt[0], attention_mask=prompt[1])
    return vps.vps_layers(model)["model.layers.0.mlp.down_proj"].plan.q.clone()


def test_each_batch_size_gets_its_own_held_plan_and_off_drops_them():
    model = vps.static_plans(vps.patch(tiny_llama(), CFG))
    layer = vps.vps_layers(model)["model.layers.1.self_attn.v_proj"]
    with torch.no_grad():
        model(input_ids=ids(2, 6))
        two = layer.plan.q
        model(input_ids=ids(1, 6))
        one = layer.plan.q
        model(input_ids=ids(2, 6, seed=5))
    assert one.shape[0] == 1 and two.shape[0] == 2 and layer.plan.q is two
    assert len(layer._plan_buffers) == 2
    vps.static_plans(model, False)
    assert not layer.static_plans and not layer._plan_buffers
    with torch.no_grad():
        model(input_ids=ids(2, 6))
    assert layer.plan.q is not two


def test_a_plan_that_carries_autograd_is_not_copied():
    model = vps.static_plans(vps.patch(tiny_llama(), CFG))
    layer = vps.vps_layers(model)["model.layers.0.mlp.down_proj"]
    layer.gain = torch.ones((), requires_grad=True)
    out = model(input_ids=ids(1, 6)).logits.sum()
    assert layer.plan.q.requires_grad and not layer._plan_buffers
    out.backward()
    assert layer.gain.grad is not None and layer.gain.grad.abs() > 0


def test_sc_plans_hold_their_mixing_coefficients_too():
    cfg = vps.VPSConfig(builder="sc", topk=8, gamma=0.8, tau=10.0)
    fresh, static = vps.patch(tiny_llama(), cfg), vps.static_plans(vps.patch(tiny_llama(), cfg))
    layer, ref = (vps.vps_layers(m)["model.layers.1.mlp.up_proj"] for m in (static, fresh))
    held = None
    for seed in (1, 2):
        x, mask = _prompt(seed)
        want = fresh.generate(x, attention_mask=mask, **GEN)
        assert torch.equal(static.generate(x, attention_mask=mask, **GEN), want)
        held = held if held is not None else layer.plan.coef
        assert held is layer.plan.coef and torch.equal(held, ref.plan.coef)
