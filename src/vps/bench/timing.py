"""Single timed calls: one prefill, a greedy decode loop, one ``generate()``; and the inputs they are fed."""

from __future__ import annotations

import time
from typing import Any, cast

import torch
from torch import nn

from ..kv_cache import cache_argument, logits_to_keep_kwargs, output_cache

__all__ = ["forward_kwargs", "make_inputs", "sync_device", "time_decode", "time_generate", "time_prefill"]


def sync_device(device: torch.device) -> None:
    """Wait for queued CUDA work on ``device`` (a no-op elsewhere), so a clock read covers the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_kwargs(model: nn.Module) -> dict[str, Any]:
    """Extra forward arguments of every timed call: only the last position's logits where the model allows it."""
    return logits_to_keep_kwargs(model, 1)


def make_inputs(model: nn.Module, batch: int, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids (fixed seed, ids >= 3 to stay clear of the usual special tokens) and an all-ones mask."""
    device = next(model.parameters()).device
    config: Any = cast(Any, model).config  # a HF model's config (nn.Module's typing does not know it)
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = int(cfg.vocab_size)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + batch * 1009 + tokens)
    ids = torch.randint(min(3, vocab - 1), vocab, (batch, tokens), generator=gen).to(device)
    return ids, torch.ones_like(ids)


def time_prefill(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> float:
    """Seconds of one prefill forward (last position's logits only, a fresh KV cache)."""
    device = ids.device
    kwargs = forward_kwargs(model)
    with torch.no_grad():
        sync_device(device)
        start = time.perf_counter()
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, **kwargs)
        sync_device(device)
        took = time.perf_counter() - start
    del out
    return took


def time_decode(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int,
                static: bool = False) -> float:
    """Seconds per greedy decode step: an untimed prefill, then ``new_tokens`` cached single-token forwards.

    Every step runs (an end-of-sequence token does not stop the loop), so the work is fixed. With
    ``static`` the cache is a preallocated ``StaticCache`` (fixed shapes, as a compiled or CUDA-graph
    decode needs: every step replays one graph).
    """
    device = ids.device
    kwargs = forward_kwargs(model)
    cache_kw = cache_argument(model)
    b, t = ids.shape
    full_mask = torch.ones(b, t + new_tokens, dtype=mask.dtype, device=device)
    full_mask[:, :t] = mask
    first: dict[str, Any] = {}
    if static:
        from transformers import StaticCache

        first[cache_kw] = StaticCache(config=cast(Any, model).config, max_cache_len=t + new_tokens)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, **first, **kwargs)
        past = output_cache(out)
        nxt = out.logits[:, -1].argmax(dim=-1, keepdim=True)
        del out
        sync_device(device)
        start = time.perf_counter()
        for i in range(new_tokens):
            step: dict[str, Any] = {"cache_position": torch.tensor([t + i], device=device)} if static else {}
            out = model(input_ids=nxt, attention_mask=full_mask[:, : t + i + 1], use_cache=True,
                        **{cache_kw: past}, **step, **kwargs)
            past = output_cache(out)
            nxt = out.logits[:, -1].argmax(dim=-1, keepdim=True)
        sync_device(device)
        took = time.perf_counter() - start
    del out, past
    return took / new_tokens


def time_generate(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int,
                  static: bool = False) -> float:
    """Seconds per new token of one greedy ``model.generate`` call producing exactly ``new_tokens`` tokens
    (``static``: with ``cache_implementation="static"``)."""
    device = ids.device
    pad = getattr(model.generation_config, "pad_token_id", None)
    if pad is None:
        pad = getattr(model.config, "pad_token_id", None)
    with torch.no_grad():
        sync_device(device)
        start = time.perf_counter()
        out = cast(Any, model).generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, pad_token_id=0 if pad is None else pad,
                             **({"cache_implementation": "static"} if static else {}))
        sync_device(device)
        took = time.perf_counter() - start
    if out.shape[1] != ids.shape[1] + new_tokens:
        raise RuntimeError(f"generate() made {out.shape[1] - ids.shape[1]} new tokens, expected {new_tokens}")
    return took / new_tokens
