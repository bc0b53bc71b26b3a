"""VPSLinear against a dense reference: y = W x + b + gamma * (W U V^T W) x (+ order 2)."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import vps
from vps.spectral import spectral_clip

FIXED = dict(adaptive_rank=False, adaptive_gamma=False, builder="sk", qk_coupling=False)


def top_indices(scores: torch.Tensor, r: int) -> list[int]:
    # Independent of the library: python sort, descending score, ties to the lower index.
    return sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))[:r]


def dense_reference(w, b, x, gamma, rank, order, tau=None):
    """The perturbation built densely from one-hot selectors, in float64."""
    w, x = w.double(), x.double()
    h0 = x @ w.T
    u_idx = top_indices(x.abs().mean(0), rank)
    v_idx = top_indices(h0.abs().mean(0), rank)
    U = torch.zeros(w.shape[1], rank, dtype=torch.float64)
    V = torch.zeros(w.shape[0], rank, dtype=torch.float64)
    U[u_idx, range(rank)] = 1
    V[v_idx, range(rank)] = 1
    A, B = w.T @ V, w @ U
    if tau is not None:
        A, B = spectral_clip(A, B, tau)
    delta_w = gamma * B @ A.T  # = gamma W U V^T W when unclipped
    if order == 2:
        M = V.T @ w @ U
        delta_w = delta_w + gamma**2 * B @ M @ A.T
    y = h0 + x @ delta_w.T
    return y + b.double() if b is not None else y


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_dense(order, bias):
    torch.manual_seed(0)
    lin = nn.Linear(24, 40, bias=bias)
    x = torch.randn(7, 24)
    cfg = vps.VPSConfig(rank=3, topk=8, gamma=0.4, tau=1e6, order=order, **FIXED)
    y = vps.VPSLinear(lin, cfg)(x)
    ref = dense_reference(lin.weight.detach(), lin.bias.detach() if bias else None, x, 0.4, 3, order)
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("order", [1, 2])
def test_clip_matches_dense(order):
    torch.manual_seed(1)
    lin = nn.Linear(16, 20)
    x = torch.randn(5, 16) * 3
    cfg = vps.VPSConfig(rank=2, topk=4, gamma=0.5, tau=0.3, order=order, **FIXED)
    y = vps.VPSLinear(lin, cfg)(x)
    ref = dense_reference(lin.weight.detach(), lin.bias.detach(), x, 0.5, 2, order, tau=0.3)
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)


def test_conv1d_matches_dense():
    torch.manual_seed(2)
    conv = Conv1D(30, 12)  # nf=30 outputs, nx=12 inputs; weight is (12, 30)
    with torch.no_grad():
        conv.weight.normal_(0, 0.3)
        conv.bias.normal_()
    x = torch.randn(6, 12)
    cfg = vps.VPSConfig(rank=2, topk=6, gamma=0.3, tau=1e6, order=2, **FIXED)
    y = vps.VPSLinear(conv, cfg)(x)
    ref = dense_reference(conv.weight.detach().T, conv.bias.detach(), x, 0.3, 2, 2)
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)


def test_batched_input_gives_each_sequence_its_own_selectors():
    torch.manual_seed(3)
    lin = nn.Linear(16, 16)
    x = torch.randn(3, 5, 16)
    layer = vps.VPSLinear(lin, vps.VPSConfig(rank=2, topk=4, tau=1e6, **FIXED))
    y = layer(x)
    for i in range(3):
        torch.testing.assert_close(y[i], layer(x[i]), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_close_to_float32(dtype):
    torch.manual_seed(4)
    lin = nn.Linear(32, 48)
    x = torch.randn(2, 6, 32)
    cfg = vps.VPSConfig(rank=2, topk=8, gamma=0.5, tau=10.0, **FIXED)
    y32 = vps.VPSLinear(lin, cfg)(x)
    layer = vps.VPSLinear(nn.Linear(32, 48).to(dtype), cfg)
    layer.base_layer.load_state_dict(lin.to(dtype).state_dict())
    y = layer(x.to(dtype))
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), y32, atol=0.1, rtol=0.05)
    assert layer.fallbacks == 0


def test_gamma_zero_is_exactly_base():
    lin = nn.Linear(8, 8)
    x = torch.randn(4, 8)
    y = vps.VPSLinear(lin, vps.VPSConfig(gamma=0.0, rank=1, topk=4))(x)
    assert torch.equal(y, lin(x))


def test_non_finite_plan_falls_back_and_counts():
    lin = nn.Linear(8, 8)
    x = torch.randn(4, 8)
    layer = vps.VPSLinear(lin, vps.VPSConfig(rank=1, topk=4, **FIXED))
    assert not torch.equal(layer(x), lin(x))
    layer.gain = torch.tensor(float("nan"))
    assert torch.equal(layer(x), lin(x))
    assert layer.fallbacks == 1


def test_rejects_non_linear_and_oversized_rank():
    with pytest.raises(TypeError, match="Conv2d"):
        vps.VPSLinear(nn.Conv2d(1, 1, 1))
    with pytest.raises(ValueError, match="rank 4"):
        vps.VPSLinear(nn.Linear(3, 8), vps.VPSConfig(rank=4, topk=4))


def test_sk_ties_go_to_lower_index():
    lin = nn.Linear(6, 6, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(6))
    x = torch.ones(2, 6)  # every input and output score ties
    layer = vps.VPSLinear(lin, vps.VPSConfig(rank=2, topk=4, **FIXED))
    layer(x)
    assert layer.plan.selection.in_idx.tolist() == [[0, 1]]
    assert layer.plan.out_idx.tolist() == [[0, 1]]


# -- the layer's own state: gain and fallback count ------------------------------------------------
def test_gain_and_fallback_count_are_non_persistent_buffers():
    layer = vps.VPSLinear(nn.Linear(8, 8), vps.VPSConfig(rank=1, topk=4, **FIXED))
    buffers = dict(layer.named_buffers(recurse=False))
    assert set(buffers) == {"gain", "_fallbacks"} and buffers["gain"] is layer.gain
    assert layer.gain.dtype == torch.float32 and layer.gain.shape == () and float(layer.gain) == 1.0
    assert set(layer.state_dict()) == {"weight", "bias"}


@pytest.mark.parametrize("cast", [lambda m: m.half(), lambda m: m.to(torch.bfloat16), lambda m: m.double(),
                                  lambda m: m.type(torch.float16)], ids=["half", "to-bf16", "double", "type"])
def test_casting_keeps_gain_float32_at_full_precision(cast):
    layer = vps.VPSLinear(nn.Linear(8, 8), vps.VPSConfig(rank=1, topk=4, **FIXED))
    layer.gain = torch.tensor(1.0 + 2**-20)  # not representable in half or bfloat16
    layer(torch.randn(3, 8))
    cast(layer)
    assert layer.weight.dtype != torch.float32
    assert layer.gain.dtype == torch.float32 and float(layer.gain) == 1.0 + 2**-20
    assert layer._fallbacks.dtype == torch.long
    y = layer(torch.randn(3, 8).to(layer.weight.dtype))
    assert y.dtype == layer.weight.dtype and layer.fallbacks == 0


def test_moving_the_layer_moves_its_state():
    layer = vps.VPSLinear(nn.Linear(8, 8), vps.VPSConfig(rank=1, topk=4, **FIXED))
    layer.reset_gain(batch=2)
    layer.to("meta")  # a real device change that needs no accelerator
    assert layer.gain.device.type == "meta" and layer.gain.shape == (2,) and layer.gain.dtype == torch.float32
    assert layer._fallbacks.device.type == "meta"


def test_moving_counts_pending_fallbacks_first():
    layer = vps.VPSLinear(nn.Linear(8, 8), vps.VPSConfig(rank=1, topk=4, **FIXED))
    layer.gain = torch.tensor(float("nan"))
    layer(torch.randn(4, 8))
    layer.double()
    assert layer.fallbacks == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_to_cuda_moves_gain_and_keeps_it_float32():
    layer = vps.VPSLinear(nn.Linear(8, 8), vps.VPSConfig(rank=1, topk=4, **FIXED)).cuda().half()
    assert layer.gain.device.type == "cuda" and layer.gain.dtype == torch.float32
    layer(torch.randn(4, 8, device="cuda", dtype=torch.float16))
    assert layer.fallbacks == 0


def test_reset_restores_the_state_after_patching():
    layer = vps.VPSLinear(nn.Linear(8, 8), vps.VPSConfig(rank=1, topk=4, **FIXED))
    x = torch.randn(4, 8)
    fresh = layer(x)
    layer.policy.update_outcome(True)
    layer.reset_gain(batch=3)
    layer.grad_mean = torch.ones(1, 8)
    layer.reset()
    assert layer.plan is None and layer.grad_mean is None and not layer.policy.history
    assert layer.gain.shape == () and float(layer.gain) == 1.0 and layer.gain.dtype == torch.float32
    assert torch.equal(layer(x), fresh)


def test_per_sequence_gains_must_match_the_batch():
    layer = vps.VPSLinear(nn.Linear(8, 8), vps.VPSConfig(rank=1, topk=4, **FIXED), name="up")
    layer.reset_gain(batch=2)
    layer(torch.randn(2, 4, 8))
    with pytest.raises(ValueError, match="up: per-sequence gains for 2 sequences"):
        layer(torch.randn(3, 4, 8))


def test_damping_is_the_series_at_minus_gamma():
    """damping=True flips the first-order term's sign and keeps the order-2 term (gamma^2) as it is."""
    import vps
    from tests.helpers.tiny import ids, logits, tiny_llama

    x = ids(2, 9)
    for order in (1, 2):
        model = tiny_llama()
        base = logits(model, x)
        deltas = {}
        for damping in (False, True):
            cfg = vps.VPSConfig(order=order, damping=damping, adaptive_rank=False, adaptive_gamma=False,
                                gamma=0.3, qk_coupling=False, builder="sk", layers=[0],
                                target_modules=["mlp.down_proj"])
            with vps.patched(model, cfg):
                deltas[damping] = logits(model, x) - base
        assert deltas[False].abs().max() > 1e-4
        # one patched layer, last in its block: to first order the logit change flips sign
        cos = torch.nn.functional.cosine_similarity(deltas[False].flatten(), deltas[True].flatten(), dim=0)
        assert cos < -0.9, (order, cos)


def test_damping_negates_the_first_order_term_exactly():
    import vps

    torch.manual_seed(0)
    base = torch.nn.Linear(16, 12)
    x = torch.randn(5, 16)
    out = {}
    for damping in (False, True):
        cfg = vps.VPSConfig(rank=2, topk=4, order=1, damping=damping, adaptive_rank=False, adaptive_gamma=False,
                            gamma=0.4)
        with torch.no_grad():
            out[damping] = vps.VPSLinear(base, cfg)(x) - base(x)
    assert out[False].abs().max() > 1e-3
    torch.testing.assert_close(out[True], -out[False])
