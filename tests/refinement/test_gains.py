"""GainOptimizer sets and resets the gains through the layers' own `reset_gain`."""

import torch

import vps
from tests.helpers.tiny import ids, tiny_llama
from vps.refinement.gains import GainOptimizer


def test_per_sequence_gains_are_set_and_reset_per_layer():
    model = vps.patch(tiny_llama(), vps.VPSConfig(topk=8, gamma=0.9, adaptive_gamma=False, lbfgs_scale=1.0))
    layers = list(vps.vps_layers(model).values())
    opt = GainOptimizer(model, batch=2)
    assert all(layer.gain.shape == (2,) and layer.gain.dtype == torch.float32 for layer in layers)
    assert all(layer.gain.device == layer.weight.device for layer in layers)
    x = ids(2, 6)
    with opt.tracking(), torch.enable_grad():
        model(input_ids=x).logits.float().pow(2).mean().backward()
    opt.step()
    assert opt.gains().ne(1.0).any()
    opt.reset()
    assert opt.gains().shape == (len(layers), 2) and opt.gains().eq(1.0).all()
    vps.reset_state(model)
    assert all(layer.gain.shape == () and float(layer.gain) == 1.0 for layer in layers)


def test_scalar_gains_leave_the_layers_as_patched():
    model = vps.patch(tiny_llama(), vps.VPSConfig(topk=8))
    layers = list(vps.vps_layers(model).values())
    before = [layer.gain for layer in layers]
    opt = GainOptimizer(model)
    assert all(layer.gain is gain for layer, gain in zip(layers, before, strict=True))
    opt.reset()
    assert all(layer.gain.shape == () and float(layer.gain) == 1.0 for layer in layers)
