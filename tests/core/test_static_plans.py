"""`vps.static_plans`: every new plan lands at the addresses of the last one of its shape (issue #18, item 2).

A CUDA graph captured around a frozen decode step reads its plan from the addresses it saw when it was
captured; these tests hold the property such a replay relies on, on CPU: tensors taken from a layer's
plan after one prompt hold the next prompt's plan after that prompt's prefill, and decoding is unchanged.
"""

import pytest
import torch

import vps
from tests.helpers.tiny import ids, tiny_llama, tiny_qwen2

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
                    captured[name] = (plan.out_idx, plan.q, plan.bias_sel, plan.a_fold)
                held_idx, held_q, held_bias, held_a = captured[name]
                assert held_q.data_ptr() == plan.q.data_ptr() and held_idx.data_ptr() == plan.out_idx.data_ptr()
                assert torch.equal(held_idx, ref.out_idx) and torch.equal(held_q, ref.q), (seed, name)
                # a captured frozen decode step reads the folded factor: it is held and rewritten too
                assert held_a.data_ptr() == plan.a_fold.data_ptr() and torch.equal(held_a, ref.a_fold), (seed, name)
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


def _replay_script():
    """benchmarks/cuda_graph_replay.py as a module (the benchmarks folder is not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "cuda_graph_replay.py"
    spec = importlib.util.spec_from_file_location("cuda_graph_replay", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cuda_graph_replay_script_runs_the_gpu_call_sequence_on_cpu(tmp_path):
    """The script's CPU path makes the GPU path's calls (prefill, hooked step, warm-ups; capture and
    replay aside), so what broke on CUDA (the warm-ups overrunning the static cache) breaks here too,
    and a replay writes the positions an eager decode of the same tokens writes (issue #34)."""
    import json

    script = _replay_script()
    out = tmp_path / "replay.json"
    assert script.main(["--device", "cpu", "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert [r["static_plans"] for r in results] == [True, False]
    for r in results:
        assert "error" not in r, r
        assert not r["graph"] and r["matches_prompt2"], r
        # prompt 1's prefill, the hooked step and every warm-up wrote to the cache, as on CUDA
        assert r["written_before_reset"] == script.TOKENS + 1 + script.WARMUPS
        assert r["seq_length_after_replay"] == script.TOKENS + script.STEPS
        assert max(r["max_abs_diff_per_step"]) <= script.TOLERANCE and r["max_abs_key_diff"] <= script.TOLERANCE
    # The cache of the broken script (one decode position) cannot hold the warm-ups: the CPU path fails as CUDA did.
    with pytest.raises(IndexError, match="out of bounds"):
        script.replay_check(torch.device("cpu"), static=True, cache_len=script.TOKENS + 1)


def test_cuda_graph_replay_check_sees_a_step_that_writes_elsewhere(monkeypatch):
    """A replay whose cache counter is one position ahead (the write position a graph would replay
    into after a miscounted warm-up) fails the check: the comparison is sensitive to where steps write."""
    from transformers import StaticCache

    script = _replay_script()
    reset = StaticCache.reset

    def reset_one_ahead(self):
        reset(self)
        for layer in self.layers:
            if layer.is_initialized:
                layer.cumulative_length.fill_(1)

    monkeypatch.setattr(StaticCache, "reset", reset_one_ahead)
    r = script.replay_check(torch.device("cpu"), static=True, cache_len=script.CACHE_LEN + 1)
    assert not r["matches_prompt2"]
    assert max(r["max_abs_diff_per_step"]) > 1e-2 and r["max_abs_key_diff"] > 1e-2
