"""A whole-model ``torch.compile`` traces each patched layer's plan as one nested compile region, reused
by every layer of a shape class, so compiling a patched model does not inline the plan's ops once per
layer (issue #34, item 3: compile time). Tracing only (a graph-inspecting backend), no inductor."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import vps
from tests.helpers.tiny import TINY_MODELS, ids
from vps import plan_region as region_mod
from vps import planning as planning_mod

pytestmark = pytest.mark.skipif(not hasattr(torch.compiler, "nested_compile_region"),
                                reason="torch without nested compile regions inlines every plan")


def _llama(blocks: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=blocks,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=0, eos_token_id=1, bos_token_id=2, initializer_range=0.3)
    return LlamaForCausalLM(cfg).eval()


def _traced(model, x, mask) -> tuple[torch.Tensor, list[str]]:
    """Logits of a compiled forward and the plan-region subgraph each invocation in its graph calls."""
    called: list[str] = []

    def backend(gm: torch.fx.GraphModule, _inputs):
        for node in gm.graph.nodes:
            if node.op == "call_function" and "invoke_subgraph" in str(node.target):
                called.append(str(node.args[0].target))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model.forward, backend=backend, fullgraph=True)(input_ids=x, attention_mask=mask).logits
    return out, called


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
def test_every_layer_plans_through_the_region_as_the_inlined_plan_does(arch: str, monkeypatch) -> None:
    """Logits equal those of the same compiled forward with the plan inlined (the pre-region trace), and
    close to eager. (Compiled GPT-2 differs from eager by ~3e-4 with or without VPS's region, so the
    exact comparison is with the inlined trace.)"""
    x = ids(2, 9)
    mask = torch.ones_like(x)
    mask[0, :2] = 0
    model = vps.patch(TINY_MODELS[arch]())
    with torch.no_grad():
        want = model(input_ids=x, attention_mask=mask).logits
        base = TINY_MODELS[arch]()(input_ids=x, attention_mask=mask).logits
    assert not torch.allclose(want, base, rtol=0, atol=1e-5), "VPS changes nothing here: proves nothing"
    got, called = _traced(model, x, mask)
    assert len(called) == len(vps.vps_layers(model)), called
    with monkeypatch.context() as m:
        m.setattr(region_mod, "_PLAN_REGION", lambda _key, *args: planning_mod.plan_tensors(*args))
        inlined, none = _traced(model, x, mask)
    assert none == []
    torch.testing.assert_close(got, inlined, rtol=0, atol=1e-6)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)  # the compiled forward is still this model's


def test_deeper_model_adds_no_new_plan_subgraphs() -> None:
    """Blocks beyond the first reuse the first block's plan subgraphs: a 3-block model traces as many
    distinct plan subgraphs as a 2-block one (one per projection kind and input-sharing role)."""
    x = ids(2, 9)
    mask = torch.ones_like(x)
    distinct = []
    for blocks in (2, 3):
        model = vps.patch(_llama(blocks))
        _, called = _traced(model, x, mask)
        assert len(called) == len(vps.vps_layers(model)) == 7 * blocks
        distinct.append(len(set(called)))
    assert distinct[0] == distinct[1] < 7 * 2, distinct


def test_outside_compile_the_eager_plan_runs(monkeypatch) -> None:
    """Eagerly, a patched layer calls `plan_tensors` itself: the region exists only inside a traced forward."""
    calls = []
    monkeypatch.setattr(region_mod, "_plan_tensors_in_region", lambda *a: calls.append(a))
    model = vps.patch(_llama(1))
    with torch.no_grad():
        model(input_ids=ids(1, 5))
    assert not calls
