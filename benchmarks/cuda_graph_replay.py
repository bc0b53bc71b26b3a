#!/usr/bin/env python
"""Does a frozen decode step captured once in a raw CUDA graph replay each new prompt's plan? (issue #18, item 2)

A random-weight Llama (built from a config here) is patched twice with the same weights: one copy
with `vps.static_plans`, one without. For each copy: prefill prompt 1 into a ``StaticCache``, run one
decode step normally (the model's hooks set the decode phase), then capture one decode step of
``model.forward`` (the unhooked forward: the hooks' host-side work has no place in a graph) in a
``torch.cuda.CUDAGraph``. Then reset the cache, prefill prompt 2 normally, put its next token in the
captured input and replay. The replayed logits are compared with an eager patched model decoding
prompt 2. With static plans they should match; without them the graph still reads prompt 1's plans,
which the second line of the result shows (the reason static plans exist).

On a machine without CUDA the "graph" is a plain call of the same unhooked forward, so only the
plumbing is checked (both lines then match). Writes JSON to ``--out`` when given.

    python benchmarks/cuda_graph_replay.py                    # on the GPU machine
    python benchmarks/cuda_graph_replay.py --out "$OUT/cuda_graph_replay.json"
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

import vps
from vps.kv_cache import cache_argument

CONFIG = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
              num_key_value_heads=4, max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=2)
BATCH, TOKENS = 2, 24


def _model(device: torch.device, static: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = vps.patch(LlamaForCausalLM(LlamaConfig(**CONFIG)).to(device).eval(),
                      vps.VPSConfig(builder="sk", decode_mode="frozen", gamma=0.8, tau=10.0))
    return vps.static_plans(model) if static else model


def _prompt(seed: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, CONFIG["vocab_size"], (BATCH, TOKENS), generator=gen).to(device)


def _eager_step_logits(model: torch.nn.Module, prompt: torch.Tensor) -> torch.Tensor:
    """Prefill ``prompt`` and one greedy decode step, both through the hooked model, on a fresh cache."""
    kw = cache_argument(model)
    cache = StaticCache(config=model.config, max_cache_len=TOKENS + 1)
    mask = torch.ones(BATCH, TOKENS + 1, dtype=torch.long, device=prompt.device)
    out = model(input_ids=prompt, attention_mask=mask[:, :TOKENS], use_cache=True, **{kw: cache},
                cache_position=torch.arange(TOKENS, device=prompt.device))
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    step = model(input_ids=nxt, attention_mask=mask, use_cache=True, **{kw: cache},
                 cache_position=torch.tensor([TOKENS], device=prompt.device))
    return step.logits[:, -1].float()


def replay_check(device: torch.device, static: bool) -> dict[str, Any]:
    """Capture after prompt 1, replay after prompt 2; compare with eager decoding of prompt 2."""
    model, twin = _model(device, static), _model(device, static=False)
    kw = cache_argument(model)
    cache = StaticCache(config=model.config, max_cache_len=TOKENS + 1)
    mask = torch.ones(BATCH, TOKENS + 1, dtype=torch.long, device=device)
    positions = torch.arange(TOKENS, device=device)
    token = torch.zeros(BATCH, 1, dtype=torch.long, device=device)  # the captured input
    step_pos = torch.tensor([TOKENS], device=device)

    def prefill(prompt: torch.Tensor) -> None:
        out = model(input_ids=prompt, attention_mask=mask[:, :TOKENS], use_cache=True, **{kw: cache},
                    cache_position=positions)
        token.copy_(out.logits[:, -1].argmax(-1, keepdim=True))

    def step() -> torch.Tensor:
        # Unhooked, the forward does not see that it continues a cache: reuse_selection says so (what
        # a frozen decode step does), so the layers apply their stored plans.
        with vps.reuse_selection(model):
            return model.forward(input_ids=token, attention_mask=mask, use_cache=True, **{kw: cache},
                                 cache_position=step_pos).logits

    with torch.no_grad():
        prefill(_prompt(1, device))
        model(input_ids=token, attention_mask=mask, use_cache=True, **{kw: cache}, cache_position=step_pos)
        replay: Callable[[], torch.Tensor]
        if device.type == "cuda":
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up on a side stream, as capture requires
                    step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                captured = step()

            def replay() -> torch.Tensor:
                graph.replay()
                return captured
        else:
            replay = step
        cache.reset()
        prefill(_prompt(2, device))
        got = replay()[:, -1].float().clone()
        want = _eager_step_logits(twin, _prompt(2, device))
        first = _eager_step_logits(twin, _prompt(1, device))
    return {"static_plans": static, "graph": device.type == "cuda",
            "max_abs_diff_vs_prompt2": float((got - want).abs().max()),
            "max_abs_diff_vs_prompt1": float((got - first).abs().max()),
            "matches_prompt2": bool(torch.allclose(got, want, rtol=1e-4, atol=1e-4))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="write the result as JSON here")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = []
    for static in (True, False):
        try:
            results.append(replay_check(device, static))
        except Exception as exc:  # a capture that fails (a host sync in the step, say) is the finding
            results.append({"static_plans": static, "error": f"{type(exc).__name__}: {exc}",
                            "matches_prompt2": False})
    for r in results:
        if "error" in r:
            print(f"static_plans={r['static_plans']!s:5s} failed: {r['error']}")
            continue
        print(f"static_plans={r['static_plans']!s:5s} graph={r['graph']!s:5s} matches prompt 2: "
              f"{r['matches_prompt2']!s:5s} (max |diff| {r['max_abs_diff_vs_prompt2']:.2e}; "
              f"vs prompt 1's decode {r['max_abs_diff_vs_prompt1']:.2e})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": str(device), "torch": torch.__version__, "results": results}, f, indent=1)
    return 0 if results[0]["matches_prompt2"] else 1


if __name__ == "__main__":
    sys.exit(main())
