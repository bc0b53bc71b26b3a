"""The public names DESIGN.md promises stay importable from the top-level package."""

import pytest

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
