"""The adaptive policy's formulas, history rule, bounds and non-finite handling (hand-computed values)."""

import math

import pytest
import torch

import vps
from tests.helpers.tiny import ids, logits, tiny_llama
from vps.policy import LayerPolicy


def policy(**kw):
    return LayerPolicy(vps.VPSConfig(**kw))


def test_energy_sigma():
    sig = policy().sigma(torch.tensor([0.0, 1.0, 2.0]))
    torch.testing.assert_close(sig, torch.tensor([0.0, 1 - math.exp(-1), 1 - math.exp(-2)]))


def test_entropy_raises_sigma_only_when_larger():
    p = policy()
    sig = p.sigma(torch.tensor([0.1, 0.1, 3.0]), torch.tensor([1.5, 0.0, 1.5]))
    torch.testing.assert_close(sig, torch.tensor([0.5, 1 - math.exp(-0.1), 1 - math.exp(-3.0)]))
    assert p.sigma(torch.tensor([0.0]), torch.tensor([9.0])).item() == 1.0  # min(1, H/3)
    off = policy(use_entropy=False).sigma(torch.tensor([0.1]), torch.tensor([1.5]))
    torch.testing.assert_close(off, torch.tensor([1 - math.exp(-0.1)]))


@pytest.mark.parametrize("outcomes,bias", [
    ([], 0.0), ([True], 0.0), ([True, True], 0.2), ([True, True, True], 0.3), ([False, False], -0.2),
    ([True, True, False], 0.0), ([False, True, True], 0.2),
])
def test_history_rule(outcomes, bias):
    p = policy(history_step=0.1)
    for o in outcomes:
        p.update_outcome(o, 0.1 if o else -0.1)
    assert p.history_bias == pytest.approx(bias)
    base = 1 - math.exp(-0.5)
    assert p.sigma(torch.tensor([0.5])).item() == pytest.approx(min(1.0, max(0.0, base + bias)), abs=1e-6)


def test_history_is_bounded():
    p = policy(history_size=3)
    for _ in range(10):
        p.update_outcome(True)
    assert len(p.history) == 3 and p.streak == 3


def test_interpolation_within_bounds():
    p = policy(rank=4, topk=16, adaptive_topk=True, topk_bounds=(8, 16), adaptive_order=True, order=2,
               rank_bounds=(1, 4), gamma_bounds=(0.1, 0.5))
    energy = torch.tensor([-math.log(1 - 0.6)])  # sigma = 0.6
    d = p.decide(energy)
    assert d.sigma.item() == pytest.approx(0.6, abs=1e-6)
    assert d.rank.item() == 3  # 1 + 3 * 0.6 = 2.8
    assert d.gamma.item() == pytest.approx(0.1 + 0.4 * 0.6)
    assert d.topk.item() == 13  # 8 + 8 * 0.6 = 12.8
    assert d.order.item() == 2  # 1.6


def test_flags_off_give_fixed_values():
    p = policy(rank=3, topk=8, gamma=0.4, adaptive_rank=False, adaptive_gamma=False)
    d = p.decide(torch.tensor([0.0, 5.0]))
    assert d.rank.tolist() == [3, 3] and d.gamma.tolist() == pytest.approx([0.4, 0.4])
    assert d.topk.tolist() == [8, 8] and d.order.tolist() == [1, 1]


def test_non_finite_inputs_give_finite_decisions():
    p = policy()
    nan, inf = float("nan"), float("inf")
    d = p.decide(torch.tensor([nan, inf, -1.0]), torch.tensor([nan, nan, inf]))
    for value in (d.sigma, d.gamma, d.rank.float(), d.topk.float(), d.order.float()):
        assert torch.isfinite(value).all()
    assert d.sigma.tolist() == [0.0, 1.0, 1.0]


def test_policy_differs_between_layers_and_prompts_and_trace_shows_it():
    model = vps.patch(tiny_llama(), vps.VPSConfig(topk=8, rank=4))
    logits(model, ids(2, 6))
    rows = vps.trace(model)
    sigmas = {round(r["sigma"][0], 6) for r in rows.values()}
    assert len(sigmas) > 1
    row = rows["model.layers.0.mlp.up_proj"]
    assert set(row) >= {"sigma", "rank", "gamma", "topk", "order", "builder", "in_idx", "out_idx", "fallbacks"}
    assert len(row["in_idx"]) == 2 and row["builder"] == "sk"
    assert "sigma=" in vps.format_summary(model)


def test_per_sequence_history():
    p = policy(history_step=0.1)
    for _ in range(2):
        p.update_outcome([True, False, True], [0.1, -0.1, 0.0])
    p.update_outcome([True, False, False], 0.0)
    assert p.streaks == [3, -3, -1]
    torch.testing.assert_close(p.bias_for(3), torch.tensor([0.3, -0.3, 0.0]))
    assert p.bias_for(2) == 0.0  # a forward of other sequences gets no history
    sig = p.sigma(torch.tensor([0.5, 0.5, 0.5]))
    base = 1 - math.exp(-0.5)
    torch.testing.assert_close(sig, torch.tensor([base + 0.3, base - 0.3, base]))
    with pytest.raises(ValueError, match="streaks"):
        _ = p.streak
    with pytest.raises(ValueError, match="records 3 sequence"):
        p.update_outcome(True)
    with pytest.raises(ValueError, match="loss delta"):
        p.update_outcome([True, True], [0.1])
    p.reset()
    p.update_outcome(True)
    p.update_outcome(True)
    assert p.bias_for(5) == pytest.approx(0.2)  # a one-sequence history applies to every sequence
