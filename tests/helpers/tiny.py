"""Tiny randomly initialised models built in code (no downloads) and a logits-invariance helper."""

from __future__ import annotations

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 97


def tiny_llama(seed: int = 0, init: float = 0.02) -> LlamaForCausalLM:
    """Llama with grouped-query attention (4 query heads, 2 key/value heads). At the default ``init`` (the
    weights' standard deviation) VPS moves logits but not greedy tokens; ``init=0.3`` makes it change them."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=0, eos_token_id=1, bos_token_id=2, initializer_range=init)
    return LlamaForCausalLM(cfg).eval()


def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    """Qwen2 (biases on q/k/v) with grouped-query attention."""
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=0, eos_token_id=1, bos_token_id=2)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # random init leaves biases at zero; make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    return model


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """GPT-2 (Conv1D layers, fused c_attn)."""
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                     pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return GPT2LMHeadModel(cfg).eval()


TINY_MODELS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gpt2": tiny_gpt2}


def ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits; with a mask, positions count from each sequence's first valid token (GPT-2 needs it)."""
    kwargs = {}
    if attention_mask is not None:
        kwargs["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits

