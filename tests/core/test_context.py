"""The forward context: when it measures next-token entropy, and what state it keeps."""

import pytest
import torch

import vps
from tests.helpers.tiny import ids, tiny_llama
from vps.patching import get_context

DYNAMIC = dict(decode_mode="dynamic")
WANT_ENTROPY = [
    # name, config overrides, whether the entropy is measured
    ("frozen decoding never rebuilds a decision", {}, False),
    ("dynamic with adaptive rank and gamma", DYNAMIC, True),
    ("dynamic but entropy switched off", dict(DYNAMIC, use_entropy=False), False),
    ("dynamic, nothing adaptive", dict(DYNAMIC, adaptive_rank=False, adaptive_gamma=False), False),
    ("dynamic, only top-k adaptive", dict(DYNAMIC, adaptive_rank=False, adaptive_gamma=False, adaptive_topk=True),
     True),
    ("dynamic, only the order adaptive",
     dict(DYNAMIC, adaptive_rank=False, adaptive_gamma=False, adaptive_order=True, order=2), True),
]


@pytest.mark.parametrize("name, overrides, expected", WANT_ENTROPY, ids=[c[0] for c in WANT_ENTROPY])
def test_want_entropy_follows_the_config(name, overrides, expected):
    cfg = vps.VPSConfig(topk=8, **overrides)
    assert cfg.want_entropy is expected
    assert "want_entropy" not in cfg.to_dict(), "derived, not a field"
    model = vps.patch(tiny_llama(), cfg)
    ctx = get_context(model)
    assert ctx.cfg is cfg
    with torch.no_grad():
        model(ids(2, 5))
    assert (ctx.entropy is not None) is expected
    if expected:
        assert ctx.entropy.shape == (2,)
    vps.reset_state(model)
    assert ctx.entropy is None and ctx.entropy_hint is None


def test_context_keeps_no_unread_state():
    ctx = get_context(vps.patch(tiny_llama(), vps.VPSConfig(topk=8)))
    for gone in ("forward_count", "last_entropy", "want_entropy"):
        assert not hasattr(ctx, gone), gone


@pytest.mark.parametrize("scope", ["sequence", "batch"])
def test_token_mask_is_built_once_per_forward_and_counts_valid_tokens(scope):
    model = vps.patch(tiny_llama(), vps.VPSConfig(topk=8, scope=scope))
    ctx = get_context(model)
    x = ids(3, 10)
    mask = torch.ones_like(x)
    mask[0, :4] = 0
    mask[2, :9] = 0
    built = []
    original = ctx.token_mask

    def spy(*args, **kwargs):
        tm = original(*args, **kwargs)
        built.append(tm)
        return tm

    ctx.token_mask = spy
    with torch.no_grad():
        model(input_ids=x, attention_mask=mask)
    assert len(built) == len(vps.vps_layers(model)) and all(tm is built[0] for tm in built)
    tm = built[0]
    if scope == "batch":  # every sequence's tokens laid out as one row
        assert tm.valid.shape == (1, 30) and tm.count.tolist() == [17.0]
        assert torch.equal(tm.pad[0, :, 0], ~mask.bool().reshape(-1))
    else:
        assert tm.count.tolist() == [6.0, 10.0, 1.0]
        assert torch.equal(tm.pad[..., 0], ~mask.bool())
    with torch.no_grad():  # all tokens valid: the unmasked statistics path, nothing to fill
        model(input_ids=x)
    assert built[-1].pad is None and built[-1].count == (30.0 if scope == "batch" else 10.0)
