"""VPS on models dispatched by accelerate: CPU / disk offload and device maps with offloaded blocks.

An offloaded layer's weight sits on the meta device until accelerate's hook loads it for the
forward; a patched model must give the same logits and the same generations as the same model held
fully in memory, and leave every offloaded weight on meta between forwards.
"""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate import cpu_offload, disk_offload, dispatch_model

import vps
from tests.helpers.tiny import TINY_MODELS, ids, logits, tiny_llama
from vps.context import VPSContext

CPU = torch.device("cpu")


def _padded(batch: int = 3, length: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    x = ids(batch, length)
    mask = torch.ones_like(x)
    mask[0, :3] = 0  # left padding on one row: the masked statistics path
    return x, mask


def _target_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [layer.weight for layer in vps.vps_layers(model).values()]


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
def test_cpu_offloaded_patched_logits_equal_in_memory(arch: str) -> None:
    cfg = vps.VPSConfig()
    reference = vps.patch(TINY_MODELS[arch](), cfg)
    offloaded = TINY_MODELS[arch]()
    cpu_offload(offloaded, execution_device=CPU)
    vps.patch(offloaded, cfg)
    assert all(w.is_meta for w in _target_weights(offloaded))
    x, mask = _padded()
    want, got = logits(reference, x, mask), logits(offloaded, x, mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # The perturbation really ran: the unpatched logits differ.
    with vps.disabled(offloaded):
        assert not torch.allclose(logits(offloaded, x, mask), got, atol=1e-4)
    assert all(w.is_meta for w in _target_weights(offloaded)), "a weight stayed loaded outside its hook"
    assert all(layer.gain.device == CPU for layer in vps.vps_layers(offloaded).values())


def test_disk_offloaded_generate_equals_in_memory(tmp_path) -> None:
    cfg = vps.VPSConfig(decode_mode="frozen")
    reference = vps.patch(tiny_llama(init=0.3), cfg)
    offloaded = tiny_llama(init=0.3)
    disk_offload(offloaded, str(tmp_path / "offload"), execution_device=CPU)
    vps.patch(offloaded, cfg)
    x, mask = _padded()
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    want = reference.generate(x, **kwargs)
    # VPS changes these tokens, so an offloaded layer that skipped it would show.
    assert not torch.equal(want, tiny_llama(init=0.3).generate(x, **kwargs))
    got = offloaded.generate(x, **kwargs)
    assert torch.equal(got, want)
    assert all(w.is_meta for w in _target_weights(offloaded))


def test_dynamic_decode_with_entropy_under_offload() -> None:
    """Dynamic decoding reads the previous step's entropy: it must reach each layer's device."""
    cfg = vps.VPSConfig(decode_mode="dynamic", use_entropy=True)
    reference = vps.patch(TINY_MODELS["qwen2"](), cfg)
    offloaded = TINY_MODELS["qwen2"]()
    cpu_offload(offloaded, execution_device=CPU)
    vps.patch(offloaded, cfg)
    x, mask = _padded()
    kwargs = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(offloaded.generate(x, **kwargs), reference.generate(x, **kwargs))


def test_device_map_with_disk_blocks(tmp_path) -> None:
    """A device map that keeps the first block in memory and sends the second one to disk."""
    cfg = vps.VPSConfig()
    base = TINY_MODELS["llama"]()
    reference = vps.patch(copy.deepcopy(base), cfg)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    dispatched = dispatch_model(base, device_map=device_map, main_device="cpu", offload_dir=str(tmp_path / "off"))
    vps.patch(dispatched, cfg)
    layers = vps.vps_layers(dispatched)
    on_disk = [n for n in layers if n.startswith("model.layers.1.")]
    assert on_disk and all(layers[n].weight.is_meta for n in on_disk)
    assert not any(layers[n].weight.is_meta for n in layers if n.startswith("model.layers.0."))
    x, mask = _padded()
    torch.testing.assert_close(logits(dispatched, x, mask), logits(reference, x, mask), rtol=1e-5, atol=1e-5)


def test_unpatch_leaves_the_offload_hooks_working() -> None:
    model = TINY_MODELS["llama"]()
    cpu_offload(model, execution_device=CPU)
    x, mask = _padded()
    before = logits(model, x, mask)
    vps.unpatch(vps.patch(model, vps.VPSConfig()))
    torch.testing.assert_close(logits(model, x, mask), before, rtol=0, atol=0)


def test_a_failing_plan_still_sends_the_weight_back(monkeypatch) -> None:
    model = TINY_MODELS["llama"]()
    cpu_offload(model, execution_device=CPU)
    vps.patch(model, vps.VPSConfig())
    layer = next(iter(vps.vps_layers(model).values()))

    def boom(*_a, **_k):
        raise RuntimeError("plan failed")

    monkeypatch.setattr(layer, "_build_plan", boom)
    with pytest.raises(RuntimeError, match="plan failed"):
        layer(torch.randn(1, 4, layer.in_features))
    assert layer.weight.is_meta


def test_the_mask_is_checked_once_per_forward_and_moved_to_other_devices() -> None:
    ctx = VPSContext(vps.VPSConfig())
    ctx.mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    ctx.in_forward = True
    valid, dense = ctx.valid_tokens(2, 3, CPU)
    assert not dense and valid.device == CPU
    # A second device gets a copy of the same mask without another check (meta stands in for a GPU).
    moved, moved_dense = ctx.valid_tokens(2, 3, torch.device("meta"))
    assert moved.is_meta and moved.shape == valid.shape and moved_dense is dense
    assert ctx.valid_tokens(2, 3, CPU)[0] is valid
    ctx.entropy = torch.tensor([0.5, 1.0])
    on_meta = ctx.entropy_for(2, torch.device("meta"))
    assert on_meta is not None and on_meta.is_meta
    assert ctx.entropy_for(2, torch.device("meta")) is on_meta  # moved once per forward
    assert ctx.entropy_for(2, CPU) is ctx.entropy


def test_from_pretrained_with_a_disk_device_map(tmp_path) -> None:
    """The path users take: ``from_pretrained(..., device_map=..., offload_folder=...)``, then patch."""
    from transformers import AutoModelForCausalLM

    TINY_MODELS["qwen2"]().save_pretrained(tmp_path / "model")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "disk", "model.layers.1": "cpu",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    cfg = vps.VPSConfig()
    reference = vps.patch(AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval(), cfg)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model", device_map=device_map,
                                                  offload_folder=str(tmp_path / "off")).eval()
    vps.patch(loaded, cfg)
    assert any(layer.weight.is_meta for layer in vps.vps_layers(loaded).values())
    x, mask = _padded()
    torch.testing.assert_close(logits(loaded, x, mask), logits(reference, x, mask), rtol=1e-5, atol=1e-5)


def _saved_llama(tmp_path):
    """A tiny Llama checkpoint directory (with a tokenizer) and a device map sending ``disk_block`` to disk."""
    from tests.helpers.tiny_eval import tiny_tokenizer

    directory = tmp_path / "model"
    TINY_MODELS["llama"]().save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory, lambda disk_block: {
        "model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu", "model.norm": "cpu",
        "model.rotary_emb": "cpu", "lm_head": "cpu", f"model.layers.{disk_block}": "disk"}


def test_load_model_takes_a_device_map(tmp_path) -> None:
    from vps.models import ModelLoadError, load_model

    directory, disk_map = _saved_llama(tmp_path)
    device_map = disk_map(1)
    with pytest.raises(ModelLoadError, match="offload_folder"):
        load_model(directory, device_map=device_map)
    with pytest.raises(ModelLoadError, match="not both"):
        load_model(directory, device="cpu", device_map="auto")
    model, _ = load_model(directory, device_map=device_map, offload_folder=tmp_path / "off")
    reference, _ = load_model(directory)
    vps.patch(model, vps.VPSConfig())
    vps.patch(reference, vps.VPSConfig())
    assert vps.vps_layers(model)["model.layers.1.mlp.down_proj"].weight.is_meta
    x, mask = _padded()
    torch.testing.assert_close(logits(model, x, mask), logits(reference, x, mask), rtol=1e-5, atol=1e-5)


def test_device_map_flag_reads_a_json_file(tmp_path) -> None:
    import argparse
    import json

    from vps.commands.common import load, parse_device_map

    directory, disk_map = _saved_llama(tmp_path)
    mapping = disk_map(0)
    path = tmp_path / "map.json"
    path.write_text(json.dumps(mapping))
    with pytest.raises(ValueError, match='sends modules to "disk": pass --offload-folder'):
        parse_device_map(str(path), None)
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        parse_device_map(str(tmp_path / "bad.json"), None)
    args = argparse.Namespace(model=str(directory), dtype="float32", device=None, device_map=str(path),
                              offload_folder=str(tmp_path / "off"))
    model, _ = load(args)
    vps.patch(model, vps.VPSConfig())
    assert vps.vps_layers(model)["model.layers.0.self_attn.q_proj"].weight.is_meta
    x, mask = _padded()
    got = logits(model, x, mask)
    # What the flag loaded is the saved model, patched: the in-memory patched copy's logits, not the unpatched.
    from vps.models import load_model

    reference, _ = load_model(directory)
    with vps.patched(reference, vps.VPSConfig()):
        torch.testing.assert_close(got, logits(reference, x, mask), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, logits(reference, x, mask), atol=1e-4)
