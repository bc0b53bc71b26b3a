"""Prefill vs decode through the real ``generate()``, on every architecture the default targets cover.

A hand-written decode loop names the cache argument itself, so it cannot notice when transformers
renames it (5.24: ``past_key_values`` -> ``cache``); these tests drive ``model.generate`` and would
have caught that rename: frozen decoding then rebuilt every layer's plan at every step.
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

import vps
from tests.helpers.tiny import TINY_MODELS, ids
from vps import layer as layer_mod
from vps.context import HiddenCacheWarning, next_token_entropy
from vps.kv_cache import (
    ForwardCall,
    cache_argument,
    cache_length,
    find_cache,
    forward_call_reader,
    is_cache,
    output_cache,
)
from vps.patching import get_context

NEW_TOKENS = 6
CFG = dict(topk=8, gamma=0.8, adaptive_gamma=False, tau=10.0)


def left_padded(batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` prompts of lengths length, length-2, ..., left padded with token 0."""
    x = ids(batch, length)
    mask = torch.ones_like(x)
    for i in range(batch):
        pad = min(2 * i, length - 1)
        x[i, :pad], mask[i, :pad] = 0, 0
    return x, mask


def generate(model, x, mask, **kw):
    with torch.no_grad():
        return model.generate(input_ids=x, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                              pad_token_id=0, **kw)


@pytest.fixture
def plan_builds(monkeypatch):
    """Counts `_build_plan` calls per layer name."""
    counts: dict[str, int] = {}
    original = layer_mod.VPSLinear._build_plan

    def counting(self, *args, **kwargs):
        counts[self.layer_name] = counts.get(self.layer_name, 0) + 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(layer_mod.VPSLinear, "_build_plan", counting)
    return counts


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
@pytest.mark.parametrize("batch", [1, 3])
def test_frozen_generate_builds_one_plan_per_layer(arch, batch, plan_builds, one_thread):
    model = vps.patch(TINY_MODELS[arch](), vps.VPSConfig(**CFG))
    x, mask = left_padded(batch, 9)
    with warnings.catch_warnings():
        warnings.simplefilter("error", HiddenCacheWarning)
        out = generate(model, x, mask)
    assert out.shape[1] == x.shape[1] + NEW_TOKENS
    assert plan_builds == {name: 1 for name in vps.vps_layers(model)}
    plan_builds.clear()
    generate(model, x, mask)  # a second call builds afresh from its own prompt, once
    assert plan_builds == {name: 1 for name in vps.vps_layers(model)}


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
def test_dynamic_generate_rebuilds_every_step(arch, plan_builds, one_thread):
    model = vps.patch(TINY_MODELS[arch](), vps.VPSConfig(**CFG, decode_mode="dynamic"))
    x, mask = left_padded(2, 8)
    generate(model, x, mask)
    assert set(plan_builds.values()) == {NEW_TOKENS}, "one plan per forward: the prefill and every decode step"


def greedy_recompute(model, x, mask, steps):
    """Greedy decoding without a cache: every step recomputes prompt + generated tokens in full."""
    seq, m = x, mask
    with torch.no_grad(), vps.reuse_selection(model):
        for _ in range(steps):
            positions = (m.cumsum(-1) - 1).clamp_min(0)
            logits = model(input_ids=seq, attention_mask=m, position_ids=positions).logits[:, -1]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
            m = torch.cat([m, torch.ones_like(m[:, :1])], dim=1)
    return seq


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
@pytest.mark.parametrize("batch", [1, 3])
def test_frozen_generate_equals_full_recompute(arch, batch, one_thread):
    model = vps.patch(TINY_MODELS[arch](), vps.VPSConfig(**CFG))
    x, mask = left_padded(batch, 9)
    out = generate(model, x, mask, return_dict_in_generate=True, output_logits=True)
    assert torch.equal(greedy_recompute(model, x, mask, NEW_TOKENS), out.sequences)
    with vps.disabled(model):
        base = generate(model, x, mask, return_dict_in_generate=True, output_logits=True)
    gap = max((a - b).abs().max().item() for a, b in zip(out.logits, base.logits, strict=True))
    assert gap > 1e-2, "the perturbation should change the logits, or the equality above proves nothing"


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
def test_dynamic_generate_sees_the_previous_steps_entropy(arch, one_thread):
    model = vps.patch(TINY_MODELS[arch](), vps.VPSConfig(**CFG, decode_mode="dynamic"))
    layer = next(iter(vps.vps_layers(model).values()))
    x, mask = left_padded(3, 8)
    used, measured = [], []

    def record(_m, _args, kwargs, output):
        used.append(layer.plan.decision.entropy)
        measured.append(next_token_entropy(output.logits, kwargs.get("attention_mask")))

    handle = model.register_forward_hook(record, with_kwargs=True)  # runs after vps's own hook
    try:
        generate(model, x, mask)
    finally:
        handle.remove()
    assert len(used) == NEW_TOKENS
    assert used[0] is None, "the prefill starts clean"
    for step in range(1, NEW_TOKENS):
        torch.testing.assert_close(used[step], measured[step - 1])


def test_a_hidden_cache_is_reported_loudly(monkeypatch, one_thread):
    """If a future transformers passes the cache in a form vps cannot recognise, generate() says so."""
    model = vps.patch(TINY_MODELS["llama"](), vps.VPSConfig(**CFG))
    ctx = vps.patching.get_context(model)
    original = ctx.begin
    monkeypatch.setattr(ctx, "begin", lambda call: original(type(call)(call.attention_mask, None, call.tokens)))
    x, mask = left_padded(2, 8)
    with pytest.warns(HiddenCacheWarning, match="did not find"):
        generate(model, x, mask)
    with warnings.catch_warnings():  # once per model, not once per step
        warnings.simplefilter("error", HiddenCacheWarning)
        generate(model, x, mask)


def test_no_warning_for_a_plain_prefill_or_an_uncached_forward(one_thread):
    model = vps.patch(TINY_MODELS["qwen2"](), vps.VPSConfig(**CFG))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error", HiddenCacheWarning)
        model(ids(2, 7), use_cache=True)
        model(ids(2, 1), use_cache=False)
        model(ids(2, 1), use_cache=True)  # one token, no cache: a prefill of one token, correctly


# -- reading forward calls ----------------------------------------------------------------------------
def test_the_cache_is_found_by_type_under_any_name_or_position(one_thread):
    model = TINY_MODELS["llama"]()
    with torch.no_grad():
        out = model(ids(1, 5), use_cache=True)
    cache = output_cache(out)
    assert is_cache(cache) and cache_length(cache) == 5
    read = forward_call_reader(model)
    x = ids(1, 1)
    mask = torch.ones(1, 6, dtype=torch.long)
    for args, kwargs in [((x, mask), {"cache": cache}), ((x, mask), {"past_key_values": cache}),
                         ((), {"input_ids": x, "attention_mask": mask, "some_future_name": cache}),
                         ((x, mask, None, cache), {})]:
        call = read(args, kwargs)
        assert call.cache is cache and call.attention_mask is mask and call.tokens == 1
    legacy = tuple((torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8)) for _ in range(2))
    assert find_cache([None, x, legacy]) is legacy and cache_length(legacy) == 4
    assert not is_cache(x) and not is_cache(()) and cache_length(None) == 0
    assert read((), {"inputs_embeds": torch.zeros(2, 3, 64)}).tokens == 3


def test_our_calls_use_the_installed_cache_name(one_thread):
    import inspect

    for make in TINY_MODELS.values():
        model = make()
        assert cache_argument(model) in inspect.signature(model.forward).parameters


def test_no_deprecated_cache_name_comes_from_vps_code(monkeypatch, one_thread, tmp_path):
    """The decode loop of the benchmark, the NLL scorer, the profiler and refinement name the cache as the
    installed transformers expects: no FutureWarning for the argument, no deprecation log for the output field."""
    from vps.bench import BenchSettings, make_inputs, time_decode, time_generate
    from vps.bench.profiling import profile_patched
    from vps.evaluation.nll import solution_nll

    logged = []
    monkeypatch.setattr(logging.Logger, "warning_once", lambda self, msg, *a, **k: logged.append(str(msg)))
    from tests.helpers.tiny_eval import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_model(tok)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x, mask = make_inputs(model, 2, 6, 0)
        vps.patch(model, vps.VPSConfig(**CFG))
        time_decode(model, x, mask, 3)
        time_generate(model, x, mask, 3)
        solution_nll(model, tok, ["1 + 1 =", "2 + 3 ="], [" 2", " 5"], scoring="cached")
        vps.refine(model, tok, "user: 2 + 2?\nassistant:", iters=1, k_samples=2, max_new_tokens=4)
        vps.unpatch(model)
        profile_patched(model, {"builder": "sk"}, BenchSettings.quick_settings(), row_limit=2)
    about_cache = [str(w.message) for w in caught if "past_key_values" in str(w.message)
                   or "`cache`" in str(w.message)]
    assert about_cache == []
    assert [m for m in logged if "past_key_values" in m or "cache_params" in m] == []


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
@pytest.mark.parametrize(("attn", "scope"), [("sdpa", "sequence"), ("eager", "sequence"), ("sdpa", "batch")])
def test_a_static_cache_generate_counts_no_padding(arch, attn, scope, one_thread):
    """generate() with a static cache hands the model a 4-D mask (boolean for sdpa, additive float for
    eager). The plans it builds for a left-padded batch must equal those built from the 2-D mask of a
    dynamic cache, which padding never enters; before vps read the 4-D mask, they counted every pad."""
    x, mask = left_padded(3, 8)
    kw = dict(return_dict_in_generate=True, output_logits=True)
    runs = []
    for cache in ({}, {"cache_implementation": "static"}):
        model = TINY_MODELS[arch]()
        model.config._attn_implementation = attn
        vps.patch(model, vps.VPSConfig(**CFG, scope=scope))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "cannot read which tokens are padding" warning
            out = generate(model, x, mask, **kw, **cache)
            with vps.disabled(model):
                base = generate(model, x, mask, **kw, **cache)
        gap = max((a - b).abs().max().item() for a, b in zip(out.logits, base.logits, strict=True))
        assert gap > 1e-2, "the perturbation should change the logits, or the equalities below prove nothing"
        plans = {name: layer.plan for name, layer in vps.vps_layers(model).items()}  # frozen: the prefill's
        runs.append((out.sequences, plans))
    (tokens, plans), (static_tokens, static_plans) = runs
    for name, plan in plans.items():
        other = static_plans[name]
        assert torch.equal(plan.out_idx, other.out_idx), name
        torch.testing.assert_close(plan.q, other.q, rtol=1e-5, atol=1e-6, msg=name)
    assert torch.equal(tokens, static_tokens)


def test_a_4d_mask_is_read_by_its_diagonal():
    from vps.context import current_tokens_mask

    valid = torch.tensor([[False, False, True, True], [True, True, True, True]])
    causal = torch.ones(4, 6, dtype=torch.bool).tril(diagonal=2)  # 2 tokens already in the cache
    attend = causal & torch.cat([torch.ones(2, 2, dtype=torch.bool), valid], dim=1)[:, None, :]
    bool_mask = attend[:, None]  # (2, 1, 4, 6)
    float_mask = torch.where(bool_mask, 0.0, torch.finfo(torch.float32).min)
    for mask in (bool_mask, float_mask, bool_mask.long(), torch.where(bool_mask, 0.0, float("-inf"))):
        assert torch.equal(current_tokens_mask(mask, 4, past=2), valid)
    assert current_tokens_mask(bool_mask, 3, past=2) is None  # the mask is not of this forward's tokens
    assert current_tokens_mask(bool_mask, 4, past=3) is None


def test_a_mask_vps_cannot_read_is_reported_once(one_thread):
    from vps.context import read_padding

    valid = torch.tensor([[False, True, True]])
    four_d = (torch.ones(3, 3, dtype=torch.bool).tril() & valid[:, None, :])[:, None]
    assert torch.equal(read_padding({"sliding_attention": four_d}, 3, 0)[0], valid)
    assert read_padding(four_d, 1, 2) == (None, True)  # one generated token
    assert read_padding(None, 3, 0) == (None, True)
    assert read_padding(torch.ones(1, 3, 3), 3, 0) == (None, False)
    # A mask of a kind vps cannot read (flex attention's BlockMask, say) is reported, once per model.
    ctx = get_context(vps.patch(TINY_MODELS["llama"](), vps.VPSConfig(**CFG)))
    with pytest.warns(UserWarning, match="attention_mask of type object was passed, from which vps cannot read"):
        ctx.begin(ForwardCall(attention_mask=object(), cache=None, tokens=3))
    assert ctx.mask is None
    ctx.end(None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ctx.begin(ForwardCall(attention_mask=torch.ones(1, 3, 3), cache=None, tokens=3))
        ctx.end(None)
