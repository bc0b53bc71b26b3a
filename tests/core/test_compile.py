"""torch.compile on a patched model: one graph with no breaks in prefill and in frozen decode, logits
that match eager, and a bounded number of compilations over ``generate()`` (issue #18, item 1).

The graph checks use ``torch._dynamo.explain`` (tracing only, fast); one test runs inductor for real
on a one-block model, as users would with ``torch.compile``.
"""

from __future__ import annotations

import re

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import vps
from tests.helpers.tiny import TINY_MODELS, ids
from vps.patching import get_context


def _inputs(batch: int = 2, length: int = 9, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    x = ids(batch, length, seed=seed)
    mask = torch.ones_like(x)
    mask[0, :2] = 0
    return x, mask


def _explain(fn, *args):
    torch._dynamo.reset()
    with torch.no_grad():
        return torch._dynamo.explain(fn)(*args)


def _reasons(exp) -> list[str]:
    return [str(b.reason).splitlines()[0] for b in exp.break_reasons]


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
@pytest.mark.parametrize("builder", ["sk", "hybrid"])
def test_prefill_traces_as_one_graph(arch: str, builder: str) -> None:
    model = vps.patch(TINY_MODELS[arch](), vps.VPSConfig(builder=builder))
    x, mask = _inputs()

    def prefill(input_ids, attention_mask):
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    exp = _explain(prefill, x, mask)
    assert (exp.graph_count, exp.graph_break_count) == (1, 0), _reasons(exp)


@pytest.mark.parametrize("decode_mode", ["frozen", "dynamic"])
def test_decode_step_traces_as_one_graph(decode_mode: str) -> None:
    model = vps.patch(TINY_MODELS["qwen2"](), vps.VPSConfig(decode_mode=decode_mode))
    x, mask = _inputs()
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(input_ids=x, attention_mask=mask, past_key_values=cache)
    step = out.logits[:, -1:].argmax(-1)
    step_mask = torch.cat([mask, torch.ones_like(step)], dim=1)

    def decode(input_ids, attention_mask):
        return model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache).logits

    exp = _explain(decode, step, step_mask)
    assert (exp.graph_count, exp.graph_break_count) == (1, 0), _reasons(exp)
    assert get_context(model).phase == "decode"


def _one_block_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0, eos_token_id=1, bos_token_id=2,
                      # Weights this large make VPS change the greedy tokens (at the default 0.02 it changes
                      # none), so a test that the compiled decode uses the current prompt's plan can fail.
                      initializer_range=0.3)
    return LlamaForCausalLM(cfg).eval()


def _stale_generate(model, plans, x, mask, kwargs):
    """``model.generate`` whose decode steps use ``plans`` (another prompt's) instead of this prompt's."""
    layers = vps.vps_layers(model)
    calls = []

    def after_prefill(_module, _args, _output):
        calls.append(None)
        if len(calls) == 1:
            for name, layer in layers.items():
                layer.plan = plans[name]

    handle = model.register_forward_hook(after_prefill)
    try:
        return model.generate(x, attention_mask=mask, **kwargs)
    finally:
        handle.remove()


def test_inductor_generate_matches_eager_with_each_prompts_own_plan(monkeypatch) -> None:
    """Compiled forward (inductor, static cache): the same greedy tokens as eager for three prompts,
    two graphs in all (prefill, decode step) and none more for later prompts, so every decode step
    replays the graph with the *current* prompt's plan, not the one it was compiled with. On this model
    VPS changes the tokens, and decoding a later prompt with the first prompt's plans changes them too,
    so equality with eager shows the current plan was used."""
    from torch._dynamo.utils import counters

    # Q/K (coupled), V and the MLP's down projection: every kind of layer, fewer kernels to build.
    cfg = vps.VPSConfig(decode_mode="frozen", target_modules=["q_proj", "k_proj", "v_proj", "down_proj"])
    eager = vps.patch(_one_block_llama(), cfg)
    model = vps.patch(_one_block_llama(), cfg)
    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(torch._inductor.config, "compile_threads", 1)  # no worker pool to start on 2 cores
    model.forward = torch.compile(model.forward, fullgraph=True)
    kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, cache_implementation="static")
    unpatched = _one_block_llama()
    layers = vps.vps_layers(eager)
    graphs, first_plans = [], {}
    for seed in (1, 2, 3):
        x, mask = _inputs(seed=seed)
        want = eager.generate(x, attention_mask=mask, **kwargs)
        if seed == 1:
            first_plans = {name: layer.plan for name, layer in layers.items()}
        else:
            assert not torch.equal(want, unpatched.generate(x, attention_mask=mask, **kwargs)), "VPS changes nothing"
            assert not torch.equal(want, _stale_generate(eager, first_plans, x, mask, kwargs)), \
                f"prompt {seed}: the first prompt's plans decode the same tokens, so this test proves nothing"
        got = model.generate(x, attention_mask=mask, **kwargs)
        assert torch.equal(got, want), f"prompt {seed}: compiled tokens differ from eager"
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs == [2, 2, 2], graphs
    assert not counters["graph_break"], dict(counters["graph_break"])
    # Logits of a compiled prefill match eager within float tolerance.
    x, mask = _inputs(seed=4)
    with torch.no_grad():
        want = eager(input_ids=x, attention_mask=mask).logits
        got = model(input_ids=x, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_compile_forward_and_back(monkeypatch) -> None:
    import functools

    from vps.compiling import compile_forward, uncompile_forward

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    model = vps.patch(TINY_MODELS["llama"](), vps.VPSConfig())
    x, mask = _inputs()
    with torch.no_grad():
        eager = model(input_ids=x, attention_mask=mask).logits
        compile_forward(model)
        with pytest.raises(ValueError, match="already compiled"):
            compile_forward(model)
        torch.testing.assert_close(model(input_ids=x, attention_mask=mask).logits, eager)
        uncompile_forward(model)
        assert not hasattr(model, "_vps_compiled")
        torch.testing.assert_close(model(input_ids=x, attention_mask=mask).logits, eager)
    with pytest.raises(ValueError, match="mode: expected one of"):
        compile_forward(model, "fastest")


def test_compile_clock_counts_compilation_not_running():
    from vps.compiling import CompileClock

    torch._dynamo.reset()
    fn = torch.compile(lambda t: torch.sin(t) * 2, backend="eager", fullgraph=True)
    x = torch.randn(4)
    with CompileClock() as first:
        fn(x)
    with CompileClock() as second:
        fn(x)
    assert first.compilations == 1 and first.seconds > 0
    assert second.compilations == 0 and second.seconds == 0.0
    fn(torch.randn(4, 3))  # outside any clock: nothing is counted after exit
    assert first.compilations == 1


def test_compiling_a_patched_model_warns_about_no_lru_cache():
    """Dynamo warns at every call of an ``lru_cache``-wrapped function it traces (issue #31); the cached
    constants use `vps.dtypes.cached_tensor`, which calls the function itself while compiling."""
    import re
    import warnings

    from vps.dtypes import cached_tensor, constant

    torch._dynamo.reset()
    model = vps.patch(TINY_MODELS["llama"](), vps.VPSConfig())
    x, mask = _inputs()
    forward = torch.compile(model.forward, backend="eager", fullgraph=True)
    with warnings.catch_warnings(record=True) as seen, torch.no_grad():
        warnings.simplefilter("always")
        forward(input_ids=x, attention_mask=mask)
    sites = [m.group(1) for w in seen if (m := re.search(r"lru_cache`-wrapped function at '([^']+)'", str(w.message)))]
    assert not sites, sites
    # eagerly the constant is still built once and shared
    assert constant(0.5, torch.float32, torch.device("cpu")) is constant(0.5, torch.float32, torch.device("cpu"))

    @cached_tensor
    def ramp(n: int) -> torch.Tensor:
        return torch.arange(n)

    @torch.compile(backend="eager", fullgraph=True)
    def shifted(t):
        return t + ramp(t.shape[0])

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.testing.assert_close(shifted(torch.ones(3, dtype=torch.long)), torch.tensor([1, 2, 3]))
    assert not [w for w in seen if "lru_cache" in str(w.message)]
    assert ramp(3) is ramp(3)


def test_generate_compile_says_what_it_does_and_reports_compile_time_apart(monkeypatch, capsys):
    """`vps generate --compile` (issue #31): "compiling..." with the scale before the first generate(),
    the compile time on its own line, tok/s without it, and a static cache (two graphs: prefill, decode)."""
    import functools

    import vps.commands.generate as generate_command
    from tests.helpers.tiny_eval import tiny_model, tiny_tokenizer
    from vps.cli import main
    from vps.compiling import compiled_graphs

    tok = tiny_tokenizer()
    model = tiny_model(tok)
    monkeypatch.setattr(generate_command, "load", lambda args: (model, tok))
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    before = compiled_graphs()
    assert main(["generate", "What is 2 + 3?", "--compile", "--max-new-tokens", "5", "--threads", "1"]) == 0
    out = capsys.readouterr()
    err = out.err.splitlines()
    start = next(i for i, ln in enumerate(err) if ln.startswith("[compiling... torch.compile(mode default"))
    assert "(2 blocks)" in err[start] and "expect minutes" in err[start]
    timing = next(i for i, ln in enumerate(err) if ln.startswith("[compile time: "))
    answer = next(i for i, ln in enumerate(err) if ln.startswith("[answer: "))
    assert start < timing < answer
    compiled = float(re.search(r"compile time: ([0-9.]+) s \((\d+) compilation", err[timing]).group(1))
    assert compiled > 0
    n, took, rate = map(float, re.search(r"(\d+) tokens in ([0-9.]+) s, ([0-9.]+) tok/s", err[answer]).groups())
    # tok/s over the time without compilation (``took`` is printed rounded to 0.1 s)
    assert n / (took + 0.05) <= rate <= n / max(took - 0.05, 1e-3)
    assert rate > 2 * n / (took + compiled)
    assert model.generation_config.cache_implementation == "static"
    assert compiled_graphs() - before == 2  # a prefill graph and one decode graph for every step
