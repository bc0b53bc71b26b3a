import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import vps


@settings(max_examples=60, deadline=None)
@given(d_in=st.integers(1, 12), d_out=st.integers(1, 12), r=st.integers(1, 5),
       tau=st.floats(1e-3, 10.0), scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2**16))
@example(d_in=1, d_out=1, r=1, tau=5.875, scale=1.0, seed=0)  # tau / tau came out one ulp below 1
def test_clip_bound_holds(d_in, d_out, r, tau, scale, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d_in, r, generator=g) * scale
    B = torch.randn(d_out, r, generator=g) * scale
    A2, B2 = vps.spectral_clip(A, B, tau)
    prod = A2.norm(dim=0) * B2.norm(dim=0)
    assert torch.all(prod <= tau * (1 + 1e-6))
    before = A.norm(dim=0) * B.norm(dim=0)
    untouched = before <= tau
    assert torch.equal(A2[:, untouched], A[:, untouched]) and torch.equal(B2[:, untouched], B[:, untouched])
    clipped = ~untouched
    torch.testing.assert_close(prod[clipped], torch.full_like(prod[clipped], tau), rtol=1e-5, atol=0)


def test_clip_hand_value():
    A = torch.tensor([[3.0], [4.0]])  # norm 5
    B = torch.tensor([[2.0]])  # norm 2 -> product 10
    A2, B2 = vps.spectral_clip(A, B, 2.5)  # scale both by 1/sqrt(10/2.5) = 1/2
    torch.testing.assert_close(A2, A / 2)
    torch.testing.assert_close(B2, B / 2)


def test_clip_rejects_bad_input():
    with pytest.raises(ValueError, match="tau"):
        vps.spectral_clip(torch.ones(2, 1), torch.ones(2, 1), 0.0)
    with pytest.raises(ValueError, match="columns"):
        vps.spectral_clip(torch.ones(2, 1), torch.ones(2, 2), 1.0)


def test_squared_clip_scales_edges():
    from vps.spectral import squared_clip_scales
    tau = 0.8
    a = torch.tensor([0.5, 0.8, 0.0, 4.0, float("nan"), float("inf")])
    b = torch.tensor([1.0, 1.0, 3.0, 2.0, 1.0, 1.0])
    s2 = squared_clip_scales(a, b, tau)
    assert s2[:3].tolist() == [1.0, 1.0, 1.0]  # below, exactly at tau, zero norm: exactly 1
    assert s2[3].item() == pytest.approx(tau / 8.0, rel=1e-6)
    assert torch.isnan(s2[4]) and s2[5].item() == 0.0  # NaN stays visible; an infinite norm clips to 0
