"""Patching tiny Llama / Qwen2 / GPT-2 models built in code."""

import pytest
import torch

import vps
from tests.helpers.tiny import TINY_MODELS, ids, logits, tiny_llama, tiny_qwen2

ARCHS = sorted(TINY_MODELS)


def cfg(**kw):
    base = dict(topk=8)
    base.update(kw)
    return vps.VPSConfig(**base)


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_invariance_base_patched_disabled_unpatched(arch):
    model = TINY_MODELS[arch]()
    x = ids(2, 9)
    base = logits(model, x)
    originals = {n: m for n, m in model.named_modules()}
    vps.patch(model, cfg(gamma=0.6, adaptive_gamma=False, tau=10.0))
    patched = logits(model, x)
    assert not torch.equal(patched, base), "VPS must change the logits"
    with vps.disabled(model):
        assert torch.equal(logits(model, x), base)
    assert not torch.equal(logits(model, x), base), "VPS is back after disabled()"
    vps.unpatch(model)
    assert torch.equal(logits(model, x), base)
    assert all(originals[n] is m for n, m in model.named_modules())


@pytest.mark.parametrize("arch", ARCHS)
def test_gamma_zero_is_identical(arch):
    model = TINY_MODELS[arch]()
    x = ids(2, 7)
    base = logits(model, x)
    vps.patch(model, cfg(gamma=0.0))
    assert torch.equal(logits(model, x), base)


@pytest.mark.parametrize("arch", ARCHS)
def test_patch_generate_unpatch(arch):
    model = TINY_MODELS[arch]()
    x = ids(2, 6)
    mask = torch.ones_like(x)
    vps.patch(model, cfg())
    out = model.generate(x, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 12)
    vps.unpatch(model)
    assert not vps.is_patched(model)


def test_state_dict_keys_and_values_unchanged():
    model = tiny_qwen2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    vps.patch(model, cfg())
    logits(model, ids(1, 5))
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    model.load_state_dict(before)  # a checkpoint of the unpatched model loads into the patched one


def test_patch_twice_and_unpatch_unpatched_raise():
    model = tiny_llama()
    vps.patch(model, cfg())
    with pytest.raises(vps.PatchError, match="already patched"):
        vps.patch(model, cfg())
    vps.unpatch(model)
    with pytest.raises(vps.PatchError, match="not patched"):
        vps.unpatch(model)


def test_a_patch_that_fails_midway_leaves_the_original_model():
    model = tiny_llama()
    before = {name: module for name, module in model.named_modules()}
    sizes = sorted({min(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)})
    assert len(sizes) > 1  # some layers take the rank below and some do not, so the failure comes midway
    rank = sizes[-1]
    with pytest.raises(ValueError, match=f"rank {rank} exceeds"):
        vps.patch(model, vps.VPSConfig(rank=rank, topk=rank))
    assert not vps.is_patched(model)
    assert {name: module for name, module in model.named_modules()} == before  # the very same modules
    vps.patch(model, cfg())  # and it patches as any model does
    assert vps.is_patched(model)


def test_default_targets_per_architecture():
    llama = vps.patch(tiny_llama(), cfg())
    names = set(vps.vps_layers(llama))
    assert len(names) == 2 * 7 and "model.layers.0.mlp.down_proj" in names
    from tests.helpers.tiny import tiny_gpt2
    gpt2 = vps.patch(tiny_gpt2(), cfg())
    assert {n.rsplit(".", 1)[-1] for n in vps.vps_layers(gpt2)} == {"c_attn", "c_proj", "c_fc"}
    assert len(vps.vps_layers(gpt2)) == 2 * 4


def test_target_rules_regex_suffix_exclude_layers():
    m = vps.patch(tiny_llama(), cfg(target_modules=r"model\.layers\.\d+\.self_attn\.(q|v)_proj"))
    assert sorted(vps.vps_layers(m)) == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                                         "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    m = vps.patch(tiny_llama(), cfg(target_modules=["up_proj", "down_proj"], exclude_modules=["down_proj"],
                                    layers=[1]))
    assert list(vps.vps_layers(m)) == ["model.layers.1.mlp.up_proj"]


@pytest.mark.parametrize("kwargs,match", [
    (dict(target_modules=["q_proj", "nonexistent_proj"]), "nonexistent_proj"),
    (dict(target_modules=r"model\.layers\.0\.self_attn"), "Linear"),
    (dict(target_modules=["q_proj"], layers=[7]), "layers"),
])
def test_bad_targets_name_themselves(kwargs, match):
    with pytest.raises(vps.PatchError, match=match):
        vps.patch(tiny_llama(), cfg(**kwargs))


def test_unknown_architecture_needs_targets():
    model = tiny_llama()
    model.config.model_type = "mystery"
    with pytest.raises(vps.PatchError, match="mystery"):
        vps.patch(model, cfg())


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padded_batch_equals_each_prompt_alone(arch):
    model = vps.patch(TINY_MODELS[arch](), cfg(gamma=0.6, tau=10.0))
    lengths = [5, 9, 7]
    prompts = [ids(1, n, seed=10 + n)[0] for n in lengths]
    width = max(lengths)
    batch = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, p in enumerate(prompts):
        batch[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    batched = logits(model, batch, mask)
    batch_sel = {n: (lay.plan.selection.in_idx.clone(), lay.plan.out_idx.clone())
                 for n, lay in vps.vps_layers(model).items()}
    for i, p in enumerate(prompts):
        alone = logits(model, p[None])
        torch.testing.assert_close(batched[i, width - len(p):], alone[0], atol=1e-4, rtol=1e-4)
        for n, layer in vps.vps_layers(model).items():
            assert torch.equal(batch_sel[n][0][i], layer.plan.selection.in_idx[0]), n
            assert torch.equal(batch_sel[n][1][i], layer.plan.out_idx[0]), n


def test_pad_token_content_never_changes_a_selection():
    model = vps.patch(tiny_llama(), cfg())
    batch = ids(2, 8)
    mask = torch.ones_like(batch)
    mask[0, :3] = 0
    logits(model, batch, mask)
    first = {n: lay.plan.selection.in_idx.clone() for n, lay in vps.vps_layers(model).items()}
    batch[0, :3] = torch.tensor([5, 50, 90])  # different pad content
    logits(model, batch, mask)
    assert all(torch.equal(first[n], lay.plan.selection.in_idx) for n, lay in vps.vps_layers(model).items())


def test_batch_scope_pools_statistics():
    model = vps.patch(tiny_llama(), cfg(scope="batch"))
    logits(model, ids(3, 6))
    layer = next(iter(vps.vps_layers(model).values()))
    assert layer.plan.batch == 1


def test_nan_in_perturbation_never_reaches_logits():
    model = tiny_llama()
    x = ids(2, 6)
    base = logits(model, x)
    vps.patch(model, cfg(target_modules=["model.layers.0.mlp.up_proj"]))
    layer = vps.vps_layers(model)["model.layers.0.mlp.up_proj"]
    layer.gain = torch.tensor(float("nan"))
    out = logits(model, x)
    assert torch.isfinite(out).all()
    assert torch.equal(out, base)
    assert layer.fallbacks == 2  # one per sequence
    assert vps.summarize(model)["fallbacks"] == 2


def test_failed_solve_falls_back(monkeypatch):
    model = tiny_llama()
    x = ids(1, 6)
    base = logits(model, x)
    vps.patch(model, cfg(builder="sc", target_modules=["model.layers.1.self_attn.v_proj"]))
    layer = vps.vps_layers(model)["model.layers.1.self_attn.v_proj"]
    real = torch.linalg.cholesky_ex
    monkeypatch.setattr(torch.linalg, "cholesky_ex",
                        lambda a: (real(a)[0], torch.ones(a.shape[0], dtype=torch.int32)))
    assert torch.equal(logits(model, x), base)
    assert layer.fallbacks == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("builder", ["sk", "sc"])
def test_low_precision_models_patch_and_generate(dtype, builder):
    model = tiny_qwen2().to(dtype)
    x = ids(2, 6)
    base = logits(model, x)
    vps.patch(model, cfg(builder=builder))
    out = logits(model, x)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert not torch.equal(out, base)
    model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert vps.summarize(model)["fallbacks"] == 0


def test_inference_mode_and_shared_input_scores():
    model = tiny_llama()
    x = ids(2, 6)
    vps.patch(model, cfg())
    with torch.no_grad():
        expected = model(x).logits
    with torch.inference_mode():
        got = model(x).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    layers = vps.vps_layers(model)
    q, v = layers["model.layers.0.self_attn.q_proj"], layers["model.layers.0.self_attn.v_proj"]
    assert torch.equal(q.plan.selection.in_idx, v.plan.selection.in_idx), "same input, same scores"



def test_a_patched_model_can_be_moved_and_cast():
    # nn.Module.to / .double() / .float() go through Module._apply on every submodule, VPSLinear too
    model = vps.patch(tiny_llama(), vps.VPSConfig())
    x = ids(2, 8)
    with torch.no_grad():
        single = model(input_ids=x).logits
        model.to(torch.float64)
        double = model(input_ids=x).logits
        model.float()
        again = model(input_ids=x).logits
    assert double.dtype == torch.float64 and torch.allclose(double.float(), single, atol=1e-4)
    assert torch.equal(again, single)
    assert vps.is_patched(model)


def test_patch_takes_a_file_a_directory_or_keyword_overrides(tmp_path):
    model = tiny_llama()
    want = cfg(rank=3, gamma=0.25)
    want.save(tmp_path / "cfg.json")
    want.save_pretrained(tmp_path / "dir")
    for source in (str(tmp_path / "cfg.json"), tmp_path / "dir"):
        vps.patch(model, source)
        assert vps.get_config(model) == want
        vps.unpatch(model)
    vps.patch(model, tmp_path / "cfg.json", gamma=0.1)  # a file, then overrides on top of it
    assert vps.get_config(model) == want.replace(gamma=0.1)
    vps.unpatch(model)
    vps.patch(model, topk=8, rank=4)  # overrides of the seed defaults
    assert vps.get_config(model) == vps.VPSConfig(topk=8, rank=4)
    vps.unpatch(model)
    with vps.patched(model, rank=1, topk=8):
        assert vps.get_config(model).rank == 1
    assert not vps.is_patched(model)


def test_patch_refuses_bad_sources_before_touching_the_model(tmp_path):
    model = tiny_llama()
    with pytest.raises(vps.ConfigError, match=r"^config file .*nope.json does not exist$"):
        vps.patch(model, tmp_path / "nope.json")
    with pytest.raises(vps.ConfigError, match=r"unknown VPSConfig field 'ranks' \(did you mean 'rank'\?\)"):
        vps.patch(model, ranks=4)
    with pytest.raises(vps.ConfigError, match=r"unknown VPSConfig field 'gama' \(did you mean 'gamma'\?\)"):
        with vps.patched(model, gama=0.1):
            pass
    with pytest.raises(TypeError, match="^cfg must be a VPSConfig"):
        vps.patch(model, 4)
    assert not vps.is_patched(model)
