"""The public names of the design (docs/design.md, README) stay importable from the top-level package."""

import pytest
import torch

import vps

PUBLIC = ["VPSConfig", "patch", "unpatch", "disabled", "VPSLinear", "make_builder", "spectral_clip",
          "EphemeralLBFGS", "CompositeVerifier", "extract_answer", "load_model", "refine", "trace",
          "reuse_selection", "update_outcome"]


@pytest.mark.parametrize("name", PUBLIC)
def test_public_name(name):
    assert callable(getattr(vps, name))


def test_builders_by_name():
    cfg = vps.VPSConfig()
    assert [vps.make_builder(n, cfg).name for n in ("sk", "sc", "hybrid")] == ["sk", "sc", "hybrid"]
    with pytest.raises(ValueError, match="magic"):
        vps.make_builder("magic", cfg)


def test_patched_context_manager_restores_the_model_even_on_error():
    from tests.helpers.tiny import ids, tiny_llama

    model = tiny_llama()
    before = {n: m for n, m in model.named_modules()}
    x = ids(1, 6)
    with torch.no_grad():
        base = model(x).logits
        with vps.patched(model, vps.VPSConfig(topk=8)) as inside:
            assert inside is model and vps.is_patched(model)
            assert not torch.equal(model(x).logits, base)
        assert not vps.is_patched(model) and torch.equal(model(x).logits, base)
        with pytest.raises(RuntimeError, match="boom"), vps.patched(model, vps.VPSConfig(topk=8)):
            raise RuntimeError("boom")
    assert not vps.is_patched(model)
    assert all(before[n] is m for n, m in model.named_modules())
