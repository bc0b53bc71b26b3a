"""Builder pieces: the feature ranking and the SC solution against a direct computation."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vps
from vps.builders import BuildInputs, rank_features
from vps.policy import LayerPolicy


@settings(max_examples=80, deadline=None)
@given(st.lists(st.sampled_from([-3e38, -2.5, -1.0, 0.0, 0.25, 1.0, 3.0, 1e-30, 7e10, 3e38, float("inf")]),
                min_size=3, max_size=24),
       st.integers(1, 3))
def test_rank_features_matches_stable_sort(values, k):
    scores = torch.tensor([values])
    k = min(k, len(values))
    expected = sorted(range(len(values)), key=lambda i: (-values[i], i))[:k]
    assert rank_features(scores, k)[0].tolist() == expected


def test_rank_features_random_rows_match_stable_sort():
    scores = torch.rand(5, 300).round(decimals=1)  # many ties
    got = rank_features(scores, 17)
    expected = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :17]
    assert torch.equal(got, expected)
    assert torch.equal(rank_features(scores, 17, nonnegative=True), expected)


def test_rank_features_nonnegative_key_differs_only_for_negative_scores():
    scores = torch.tensor([[0.5, -1.0, -2.0, 0.0]])
    assert rank_features(scores, 4)[0].tolist() == [0, 3, 1, 2]
    # The fast key assumes no sign bit: negative scores then rank below every non-negative one, but
    # in reverse order, which is why callers must promise non-negativity.
    assert rank_features(scores, 4, nonnegative=True)[0].tolist() == [0, 3, 2, 1]


def test_sc_solves_the_ridge_system():
    torch.manual_seed(0)
    cfg = vps.VPSConfig(rank=2, topk=4, alpha=0.1, adaptive_rank=False, adaptive_gamma=False)
    x, h0 = torch.randn(1, 9, 6), torch.randn(1, 9, 5)
    mask = torch.ones(1, 9, dtype=torch.bool)
    in_rank, out_rank = torch.tensor([[3, 0, 5, 1]]), torch.tensor([[4, 2, 0, 1]])
    decision = LayerPolicy(cfg).decide(torch.tensor([1.0]))
    sel = vps.make_builder("sc", cfg).build(BuildInputs(x, h0, mask, in_rank, out_rank, decision))
    xa, y = x[0][:, in_rank[0]].double(), h0[0][:, out_rank[0]].double()
    t = torch.linalg.solve(xa.T @ xa + 0.1 * torch.eye(4, dtype=torch.float64), xa.T @ y)  # (K_in, K_out)
    coef = t.T[:, :2]
    coef = coef / coef.norm(dim=0, keepdim=True)
    torch.testing.assert_close(sel.coef[0].double(), coef, atol=1e-5, rtol=1e-5)
    assert sel.in_idx.tolist() == [[3, 0]] and sel.ok.all()


@pytest.mark.parametrize("name", ["sk", "sc", "hybrid"])
def test_builders_respect_rank_and_mask(name):
    cfg = vps.VPSConfig(rank=2, topk=4)
    x, h0 = torch.randn(2, 5, 6), torch.randn(2, 5, 5)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, :2] = False
    decision = LayerPolicy(cfg).decide(torch.tensor([1.0, 2.0]))
    ranks = rank_features(torch.rand(2, 6), 4), rank_features(torch.rand(2, 5), 4)
    sel = vps.make_builder(name, cfg).build(BuildInputs(x, h0, mask, *ranks, decision))
    assert sel.in_idx.shape == (2, 2)
    assert sel.builder == ("sk" if name == "hybrid" else name)
