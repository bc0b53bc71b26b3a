"""`vps.lean_gather.gather_features`: torch.gather's values and gradients, without keeping the base output
alive for the backward pass."""

import pytest
import torch

import vps
from tests.helpers.tiny import TINY_MODELS, ids
from vps.lean_gather import gather_features
from vps.refinement.gains import GainOptimizer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_values_and_gradients_equal_torch_gather(dtype):
    g = torch.Generator().manual_seed(0)
    source = torch.randn(3, 7, 40, generator=g).to(dtype)
    # the plan's index: one set of features per sequence, expanded (stride 0) over the tokens
    index = torch.stack([torch.randperm(40, generator=g)[:5] for _ in range(3)]).unsqueeze(1).expand(3, 7, 5)
    weights = torch.randn(3, 7, 5, generator=g).to(dtype)
    grads = []
    for gather in (gather_features, lambda s, i: torch.gather(s, 2, i)):
        leaf = source.clone().requires_grad_(True)
        out = gather(leaf, index)
        (out.float() * weights.float()).sum().backward()
        grads.append((out.detach(), leaf.grad))
    (lean_out, lean_grad), (ref_out, ref_grad) = grads
    assert torch.equal(lean_out, ref_out) and torch.equal(lean_grad, ref_grad)
    assert lean_grad.abs().sum() > 0


def test_without_autograd_it_is_torch_gather():
    source = torch.randn(1, 4, 6, requires_grad=True)
    index = torch.zeros(1, 4, 2, dtype=torch.long)
    with torch.no_grad():
        assert gather_features(source, index).grad_fn is None
    assert gather_features(source.detach(), index).grad_fn is None
    assert type(gather_features(source, index).grad_fn).__name__ == "_LeanGatherBackward"


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
def test_a_backward_through_patched_layers_keeps_no_base_output(arch):
    """Refinement's surrogate step: the gains carry autograd, the weights do not. torch.gather would save
    every patched layer's base output ``W x`` for the backward pass; nothing may save it now."""
    model = vps.patch(TINY_MODELS[arch](), vps.VPSConfig(topk=8))
    x = ids(2, 9)
    with torch.no_grad():
        patched_logits = model(x).logits
        with vps.disabled(model):
            base = model(x).logits
    assert not torch.equal(patched_logits, base), "VPS must change this model's output, or the test proves nothing"
    # Held, not just their addresses: a freed output's address could be reused by a saved tensor.
    base_outputs: list[torch.Tensor] = []
    for layer in vps.vps_layers(model).values():
        layer.base_layer.register_forward_hook(lambda m, a, out: base_outputs.append(out))
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    gains = GainOptimizer(model, batch=2)
    for p in model.parameters():
        p.requires_grad_(False)
    with gains.tracking(), torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).logits.float().log_softmax(-1)[..., 5].mean().neg().backward()
    assert gains.gradient().abs().sum() > 0, "the backward reached the gains"
    assert len(base_outputs) == len(vps.vps_layers(model))
    kept = {t.untyped_storage().data_ptr() for t in saved}
    assert not kept & {t.untyped_storage().data_ptr() for t in base_outputs}
