#!/usr/bin/env python
"""Does a frozen decode step captured once in a raw CUDA graph replay each new prompt's plan? (issues #18, #34)

A random-weight Llama (built from a config here) is patched twice with the same weights: one copy
with `vps.static_plans`, one without. For each copy, one call sequence:

1. prefill prompt 1 into a ``StaticCache``, then one decode step through the hooked model (the
   model's hooks set the decode phase);
2. ``WARMUPS`` calls of the decode step (``model.forward``, the unhooked forward: the hooks' host-side
   work has no place in a graph), then the capture of one call;
3. reset the cache, prefill prompt 2 through the hooked model, and replay the step ``STEPS`` times,
   feeding it the tokens an eager patched twin decodes greedily from prompt 2 (the same tokens, so the
   logits of every step compare one to one).

Each replayed step's logits are compared with the twin's, and the cache's keys with the twin's cache:
a step that writes its key / value anywhere but the position the replay expects changes the next
step's attention, so the later steps' logits and the keys both show it. With static plans the replay
should match; without them a graph still reads prompt 1's plans, which the second line of the result
shows (the reason static plans exist).

On CUDA the capture is ``torch.cuda.graph`` after the warm-ups on a side stream. On a CPU the same
sequence of calls runs, warm-ups included; only the capture and the replay differ: a capture does not
run its kernels, so on CPU it is skipped and a replay is a plain call of the step. The cache is sized
for every write of the sequence: with transformers 5.x a ``StaticCache`` layer writes at its own
counter, which every call advances whatever ``cache_position`` says, so the hooked step and the
warm-ups after prompt 1 write at TOKENS, TOKENS + 1, ..., and an undersized cache fails on CPU exactly
as it does on CUDA (there as a device-side assert in ``index_copy_``). Writes JSON to ``--out``.

    python benchmarks/cuda_graph_replay.py                    # on the GPU machine
    python benchmarks/cuda_graph_replay.py --out "$OUT/cuda_graph_replay.json"
    python benchmarks/cuda_graph_replay.py --device cpu       # the same call sequence on a CPU
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
WARMUPS = 2  # decode-step calls before the capture (on CUDA on a side stream, as capturing requires)
STEPS = 3  # decode steps replayed after prompt 2's prefill
# Every write of the sequence fits: after prompt 1 the hooked step and the warm-ups write at TOKENS ..
# TOKENS + WARMUPS (a transformers 5.x static layer advances its own counter on every call); after
# prompt 2 the replays write at TOKENS .. TOKENS + STEPS - 1.
CACHE_LEN = TOKENS + max(1 + WARMUPS, STEPS)
TOLERANCE = 1e-4


def _model(device: torch.device, static: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = vps.patch(LlamaForCausalLM(LlamaConfig(**CONFIG)).to(device).eval(),
                      vps.VPSConfig(builder="sk", decode_mode="frozen", gamma=0.8, tau=10.0))
    return vps.static_plans(model) if static else model


def _prompt(seed: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, CONFIG["vocab_size"], (BATCH, TOKENS), generator=gen).to(device)


def _keys(cache: StaticCache, length: int) -> torch.Tensor:
    """The cached keys of every layer at positions 0 .. length - 1, stacked (layers, B, heads, length, dim)."""
    return torch.stack([layer.keys[:, :, :length].float() for layer in cache.layers])


def _seq_length(cache: StaticCache) -> int:
    return int(cache.get_seq_length())


def eager_decode(model: torch.nn.Module, prompt: torch.Tensor, cache_len: int = CACHE_LEN
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Prefill ``prompt``, then ``STEPS`` greedy decode steps, all through the hooked model, on a fresh cache.

    Returns the tokens fed to each step (the prefill's greedy token first), each step's last-position
    logits, and the cache's keys at the positions written.
    """
    kw = cache_argument(model)
    device = prompt.device
    cache = StaticCache(config=model.config, max_cache_len=cache_len)
    mask = torch.ones(BATCH, TOKENS + STEPS, dtype=torch.long, device=device)
    out = model(input_ids=prompt, attention_mask=mask[:, :TOKENS], use_cache=True, **{kw: cache},
                cache_position=torch.arange(TOKENS, device=device))
    tokens, logits = [out.logits[:, -1].argmax(-1, keepdim=True)], []
    for i in range(STEPS):
        out = model(input_ids=tokens[-1], attention_mask=mask[:, :TOKENS + i + 1], use_cache=True, **{kw: cache},
                    cache_position=torch.tensor([TOKENS + i], device=device))
        logits.append(out.logits[:, -1].float())
        tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
    return tokens[:STEPS], logits, _keys(cache, TOKENS + STEPS)


def _capture(step: Callable[[], torch.Tensor], device: torch.device) -> Callable[[], torch.Tensor]:
    """The warm-ups and the capture of ``step``; returns the replay.

    Both paths run the same ``WARMUPS`` calls, so they write the same cache positions. On CUDA the
    warm-ups run on a side stream and ``torch.cuda.graph`` records one call without running it; a
    replay runs the recorded kernels and returns the captured output tensor. On a CPU nothing is
    recorded (a capture runs no kernels, so skipping it leaves the same state) and a replay calls the step.
    """
    if device.type == "cuda":
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUPS):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step()

        def replay() -> torch.Tensor:
            graph.replay()
            return captured

        return replay
    for _ in range(WARMUPS):
        step()
    return step


def replay_check(device: torch.device, static: bool, cache_len: int = CACHE_LEN) -> dict[str, Any]:
    """Warm up and capture after prompt 1, replay after prompt 2; compare with an eager twin decoding prompt 2."""
    model, twin = _model(device, static), _model(device, static=False)
    kw = cache_argument(model)
    cache = StaticCache(config=model.config, max_cache_len=cache_len)
    # The captured inputs: a graph reads them at the addresses it saw, so they are rewritten in place.
    token = torch.zeros(BATCH, 1, dtype=torch.long, device=device)
    step_pos = torch.tensor([TOKENS], device=device)
    # One fixed-shape mask over the whole cache: ones up to the step's position, zeros after (transformers
    # pads a shorter mask with zeros to the cache's length, which is the same mask).
    mask = torch.zeros(BATCH, cache_len, dtype=torch.long, device=device)
    positions = torch.arange(TOKENS, device=device)

    def prefill(prompt: torch.Tensor) -> None:
        mask.zero_()
        mask[:, :TOKENS + 1] = 1
        out = model(input_ids=prompt, attention_mask=mask[:, :TOKENS], use_cache=True, **{kw: cache},
                    cache_position=positions)
        token.copy_(out.logits[:, -1].argmax(-1, keepdim=True))
        step_pos.fill_(TOKENS)

    def step() -> torch.Tensor:
        # Unhooked, the forward does not see that it continues a cache: reuse_selection says so (what
        # a frozen decode step does), so the layers apply their stored plans.
        with vps.reuse_selection(model):
            return model.forward(input_ids=token, attention_mask=mask, use_cache=True, **{kw: cache},
                                 cache_position=step_pos).logits

    with torch.no_grad():
        prefill(_prompt(1, device))
        model(input_ids=token, attention_mask=mask, use_cache=True, **{kw: cache}, cache_position=step_pos)
        replay = _capture(step, device)
        written_before_reset = _seq_length(cache)
        cache.reset()
        prefill(_prompt(2, device))
        want_tokens, want_logits, want_keys = eager_decode(twin, _prompt(2, device), cache_len)
        diffs = []
        for i in range(STEPS):
            token.copy_(want_tokens[i])  # the twin's tokens: every step's logits compare one to one
            step_pos.fill_(TOKENS + i)
            mask[:, TOKENS + i] = 1
            got = replay()[:, -1].float()
            diffs.append(float((got - want_logits[i]).abs().max()))
        seq_length = _seq_length(cache)
        key_diff = float((_keys(cache, TOKENS + STEPS) - want_keys).abs().max())
    return {"static_plans": static, "graph": device.type == "cuda", "warmups": WARMUPS, "steps": STEPS,
            "cache_len": cache_len, "written_before_reset": written_before_reset,
            "seq_length_after_replay": seq_length, "expected_seq_length": TOKENS + STEPS,
            "max_abs_diff_per_step": diffs, "max_abs_key_diff": key_diff,
            "matches_prompt2": bool(max(diffs) <= TOLERANCE and key_diff <= TOLERANCE
                                    and seq_length == TOKENS + STEPS)}


def main(argv: list[str] | None = None) -> int:
    """Run the check with and without static plans; exit 0 when the static-plans replay matches eager."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="write the result as JSON here")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda where available)")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
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
              f"{r['matches_prompt2']!s:5s} (max |diff| per replayed step "
              f"{', '.join(f'{d:.2e}' for d in r['max_abs_diff_per_step'])}; keys {r['max_abs_key_diff']:.2e}; "
              f"cache length {r['seq_length_after_replay']}, expected {r['expected_seq_length']})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": str(device), "torch": torch.__version__, "results": results}, f, indent=1)
    return 0 if results[0]["matches_prompt2"] else 1


if __name__ == "__main__":
    sys.exit(main())
