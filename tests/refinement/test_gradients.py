"""Gradient capture, Hybrid -> SC switching, per-layer gains with L-BFGS, and weights never changing."""

import gc

import torch

import vps
from tests.helpers.tiny import ids, tiny_llama
from vps.refinement.gains import GainOptimizer

NAME = "model.layers.1.mlp.down_proj"
SCALE = 20.0


def backward_once(model, x, mask=None):
    out = model(input_ids=x, attention_mask=mask)
    out.logits.float().log_softmax(-1)[..., 5].mean().neg().backward()


def test_backward_fills_masked_mean_gradient():
    model = vps.patch(tiny_llama(), vps.VPSConfig(topk=8))
    layer = vps.vps_layers(model)[NAME]
    full = {}

    def keep_full_gradient(module, args, y):
        y.register_hook(lambda g: full.update(g=g))

    layer.register_forward_hook(keep_full_gradient)
    x = ids(2, 6)
    mask = torch.ones_like(x)
    mask[1, :2] = 0
    backward_once(model, x, mask)
    g = full["g"]
    expected = torch.stack([g[0].mean(0), g[1, 2:].mean(0)])
    torch.testing.assert_close(layer.grad_mean, expected)


def test_hybrid_switches_to_sc_after_backward_and_consumes_gradient():
    model = vps.patch(tiny_llama(), vps.VPSConfig(topk=8))
    layer = vps.vps_layers(model)[NAME]
    x = ids(1, 6)
    with torch.no_grad():
        model(x)
    assert layer.plan.selection.builder == "sk"
    backward_once(model, x)
    assert layer.grad_mean is not None
    with torch.no_grad():
        model(x)
    assert layer.plan.selection.builder == "sc"
    assert layer.grad_mean is None, "a gradient is consumed by the forward that uses it"
    with torch.no_grad():
        model(x)
    assert layer.plan.selection.builder == "sk"


def test_gradient_changes_the_sc_perturbation():
    model = vps.patch(tiny_llama(), vps.VPSConfig(topk=8, builder="sc", grad_eta=0.5))
    layer = vps.vps_layers(model)[NAME]
    x = ids(1, 6)
    with torch.no_grad():
        plain = model(x).logits
    coef_plain = layer.plan.coef.clone()
    backward_once(model, x)
    with torch.no_grad():
        steered = model(x).logits
    assert not torch.allclose(layer.plan.coef, coef_plain)
    assert not torch.equal(plain, steered)
    vps.clear_gradients(model)
    with torch.no_grad():
        assert torch.equal(model(x).logits, plain)


def test_memory_stays_flat_over_100_iterations():
    model = vps.patch(tiny_llama(), vps.VPSConfig(topk=8))
    opt = GainOptimizer(model)
    x = ids(1, 6)

    def live_tensors():
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    counts = []
    for i in range(100):
        with opt.tracking():
            backward_once(model, x)
        opt.step()
        with torch.no_grad():
            model(x)
        if i in (10, 99):
            counts.append(live_tensors())
    assert counts[1] <= counts[0] + 5, counts
    assert all(layer.grad_mean is None for layer in vps.vps_layers(model).values())


def test_lbfgs_preconditions_gain_steps_and_plain_mode_scales_gradient():
    x = ids(1, 6)
    steps = {}
    for enabled in (True, False):
        model = vps.patch(tiny_llama(), vps.VPSConfig(topk=8, lbfgs_enabled=enabled, lbfgs_scale=SCALE, gamma=0.9,
                                                      tau=100.0, adaptive_gamma=False))
        opt = GainOptimizer(model)
        history = []
        for _ in range(3):
            before = opt.gains()
            with opt.tracking():
                backward_once(model, x)
            grad = opt.gradient()
            info = opt.step()
            history.append((before, grad, opt.gains(), info))
        steps[enabled] = history
    # plain: gain_{t+1} - gain_t = -scale * grad
    for before, grad, after, _ in steps[False]:
        torch.testing.assert_close(after - before, -SCALE * grad, rtol=1e-3, atol=1e-7)
        assert (after - before).abs().max() > 1e-4, "the step must be visible"
    # L-BFGS: the first step has no curvature pairs (plain), later ones are preconditioned
    before, grad, after, info = steps[True][0]
    torch.testing.assert_close(after - before, -SCALE * grad, rtol=1e-3, atol=1e-7)
    before, grad, after, info = steps[True][2]
    assert info["lbfgs_pairs"] >= 1
    assert not torch.allclose(after - before, -SCALE * grad, rtol=1e-2, atol=1e-7)


def test_weights_never_change():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    vps.patch(model, vps.VPSConfig(topk=8, decode_mode="dynamic"))
    opt = GainOptimizer(model)
    x = ids(2, 6)
    for i in range(5):
        with opt.tracking():
            backward_once(model, x)
        opt.step()
        vps.update_outcome(model, i % 2 == 0, 0.1)
        model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=4, do_sample=False, pad_token_id=0)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    vps.unpatch(model)
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)
