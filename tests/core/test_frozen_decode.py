"""Frozen decoding applies the stored plan folded, ``out += (x @ A) @ Q`` (issue #34, item 1).

The folded form must compute what the unfolded one (gather the base output, subtract the bias, mix by
the SC coefficients, then ``@ Q``) computes, up to float rounding, and every new prompt must get its
own folded factors. Each test first checks that the perturbation changes the outputs it compares, so
an equality never holds only because VPS did nothing. The op count of the folded step is held by
tests/core/test_op_budget.py.
"""

from __future__ import annotations

import pytest
import torch

import vps
from tests.helpers.tiny import TINY_MODELS, ids
from vps import builders as builders_mod
from vps import layer as layer_mod
from vps.kv_cache import cache_argument, output_cache

CFG = dict(topk=8, gamma=0.8, adaptive_gamma=False, tau=10.0)
VARIANTS = {
    "sk": dict(CFG, builder="sk"),
    "sc order 2, clip bites": dict(CFG, builder="sc", rank=3, order=2, tau=0.3),
    "batch scope": dict(CFG, builder="sk", scope="batch"),
    "damping, adaptive rank": dict(CFG, builder="sk", damping=True, adaptive_rank=True),
}
TIGHT = dict(rtol=1e-5, atol=1e-5)


def _prompt(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    x = ids(2, 9, seed=seed)
    mask = torch.ones_like(x)
    x[0, :3], mask[0, :3] = 0, 0  # left padding, as generate() batches prompts
    return x, mask


def _continuation(seed: int = 7, steps: int = 4) -> torch.Tensor:
    return ids(2, steps, seed=seed)


def _reference(model: torch.nn.Module, on: bool = True) -> None:
    """Switch every layer to the unfolded reference application of a reused plan (or back)."""
    for layer in vps.vps_layers(model).values():
        layer.folded_decode = not on


def _decode(model, prompt, mask, cont, after_prefill=None) -> torch.Tensor:
    """Logits (B, steps, vocab) of KV-cached decode steps feeding ``cont`` one token at a time after a
    prefill of ``prompt`` (teacher forcing, so every variant sees the same tokens)."""
    kw = cache_argument(model)
    with torch.no_grad():
        out = model(input_ids=prompt, attention_mask=mask, use_cache=True)
        if after_prefill is not None:
            after_prefill()
        cache, steps = output_cache(out), []
        for i in range(cont.shape[1]):
            mask = torch.cat([mask, torch.ones_like(cont[:, :1])], dim=1)
            out = model(input_ids=cont[:, i:i + 1], attention_mask=mask, use_cache=True, **{kw: cache})
            steps.append(out.logits[:, -1])
    return torch.stack(steps, dim=1)


@pytest.fixture
def folded_calls(monkeypatch):
    """Counts calls of the folded application, so a test knows the decode steps really took it."""
    calls = {"n": 0}
    original = layer_mod.VPSLinear._apply_folded

    def counting(self, *args, **kwargs):
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(layer_mod.VPSLinear, "_apply_folded", counting)
    return calls


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_folded_decode_steps_match_the_unfolded_reference(arch, variant, folded_calls, one_thread):
    model = vps.patch(TINY_MODELS[arch](), vps.VPSConfig(**VARIANTS[variant]))
    layers = len(vps.vps_layers(model))
    prompt, mask = _prompt()
    cont = _continuation()
    with vps.disabled(model):
        base = _decode(model, prompt, mask, cont)
    folded = _decode(model, prompt, mask, cont)
    assert folded_calls["n"] == layers * cont.shape[1], "every decode step of every layer applies the folded plan"
    _reference(model)
    reference = _decode(model, prompt, mask, cont)
    assert folded_calls["n"] == layers * cont.shape[1], "the reference path does not fold"
    # 100x the tolerance below: the two paths agree far more closely than VPS moves the logits
    assert (reference - base).abs().max() > 1e-3, "the perturbation should change the decode logits"
    torch.testing.assert_close(folded, reference, **TIGHT)


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
def test_a_full_recompute_under_reuse_selection_matches_the_reference(arch, one_thread):
    """`vps.reuse_selection` reuses the plan for a many-token forward: the folded path has a T > 1 too."""
    model = vps.patch(TINY_MODELS[arch](), vps.VPSConfig(**VARIANTS["sc order 2, clip bites"]))
    prompt, mask = _prompt()
    full = torch.cat([prompt, _continuation()], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(full[:, 9:])], dim=1)
    with torch.no_grad():
        model(input_ids=prompt, attention_mask=mask)
        with vps.reuse_selection(model):
            folded = model(input_ids=full, attention_mask=full_mask).logits
            _reference(model)
            reference = model(input_ids=full, attention_mask=full_mask).logits
            with vps.disabled(model):
                base = model(input_ids=full, attention_mask=full_mask).logits
    assert (reference - base).abs().max() > 1e-3
    torch.testing.assert_close(folded, reference, **TIGHT)


# GPT-2's random init (weights of std 0.02) leaves the perturbation, quadratic in W, too weak to flip a
# greedy token of the tiny model; its decode logits are compared above.
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_generate_gives_the_reference_greedy_tokens(arch, one_thread):
    model = vps.patch(TINY_MODELS[arch](), vps.VPSConfig(**CFG))
    x = ids(3, 9, seed=3)
    mask = torch.ones_like(x)
    x[0, :4], mask[0, :4] = 0, 0
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        with vps.disabled(model):
            base = model.generate(x, **kwargs)
        folded = model.generate(x, **kwargs)
        _reference(model)
        reference = model.generate(x, **kwargs)
    assert not torch.equal(reference, base), "the perturbation should change some greedy tokens"
    assert torch.equal(folded, reference)


def test_a_new_prompt_gets_new_folded_factors(one_thread):
    make = TINY_MODELS["qwen2"]  # biases: the fold also absorbs the bias subtraction
    cfg = vps.VPSConfig(**VARIANTS["sc order 2, clip bites"])
    model = vps.patch(make(), cfg)
    layers = vps.vps_layers(model)
    first, first_mask = _prompt(seed=1)
    second, second_mask = _prompt(seed=2)
    cont = _continuation()
    _decode(model, first, first_mask, cont)
    first_plans = {name: layer.plan for name, layer in layers.items()}

    got = _decode(model, second, second_mask, cont)
    changed = [name for name, layer in layers.items()
               if not torch.equal(layer.plan.a_fold, first_plans[name].a_fold)]
    assert len(changed) == len(layers), "every layer's folded factor is rebuilt by the new prefill"

    fresh = vps.patch(make(), cfg)  # the same weights, never saw the first prompt, unfolded
    _reference(fresh)
    want = _decode(fresh, second, second_mask, cont)
    torch.testing.assert_close(got, want, **TIGHT)

    def keep_first_plans():
        for name, layer in layers.items():
            layer.plan = first_plans[name]

    stale = _decode(model, second, second_mask, cont, after_prefill=keep_first_plans)
    assert (stale - want).abs().max() > 1e-3, "decoding with the first prompt's factors must differ"


def test_the_gain_gradient_through_a_frozen_step_matches_the_reference(one_thread):
    """Refinement optimises the gains through Q: a folded step passes the same gradient back."""
    grads = []
    for reference in (False, True):
        model = vps.patch(TINY_MODELS["llama"](), vps.VPSConfig(**VARIANTS["sc order 2, clip bites"]))
        layer = vps.vps_layers(model)["model.layers.1.mlp.down_proj"]
        layer.gain = torch.ones((), requires_grad=True)
        _reference(model, reference)
        prompt, mask = _prompt()
        kw = cache_argument(model)
        out = model(input_ids=prompt, attention_mask=mask, use_cache=True)
        assert layer.plan.q.requires_grad
        step_mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        step = model(input_ids=_continuation()[:, :1], attention_mask=step_mask, use_cache=True,
                     **{kw: output_cache(out)})
        step.logits.sum().backward()
        grads.append(layer.gain.grad.clone())
    assert grads[1].abs() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_a_failed_sc_selection_falls_back_in_prefill_and_decode(monkeypatch, one_thread):
    """A failed solve may leave NaN coefficients; its sequence gets the base output, not NaN (NaN * 0)."""
    build = builders_mod.SCBuilder.build

    def broken(self, inp):
        sel = build(self, inp)
        coef = sel.coef.clone()
        coef[0] = float("nan")
        ok = torch.ones(coef.shape[0], dtype=torch.bool)
        ok[0] = False
        return builders_mod.Selection(sel.in_idx, sel.out_idx, coef, ok, sel.builder)

    monkeypatch.setattr(builders_mod.SCBuilder, "build", broken)
    model = vps.patch(TINY_MODELS["llama"](), vps.VPSConfig(**dict(CFG, builder="sc")))
    prompt, mask = _prompt()
    cont = _continuation()
    with vps.disabled(model):
        base = _decode(model, prompt, mask, cont)
    folded = _decode(model, prompt, mask, cont)
    _reference(model)
    reference = _decode(model, prompt, mask, cont)
    for got in (folded, reference):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got[0], base[0])  # the failed sequence: exactly the base model
        assert (got[1] - base[1]).abs().max() > 1e-3  # the other one is still perturbed
    assert all(layer.fallbacks > 0 for layer in vps.vps_layers(model).values())
