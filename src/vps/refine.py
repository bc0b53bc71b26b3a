"""Iterative refinement with the verifier in the loop (seed sections 6 and 8.3).

Iteration 0 decodes. Every later iteration

1. feeds the next-token entropy measured at the previous decode's first step to the policy
   (`set_entropy_hint`: the next prefill's sigma sees it);
2. reports whether the previous candidate improved the verifier loss to every layer's policy
   (`update_outcome`, which drives the improvement-history rule);
3. computes a short, teacher-forced cross-entropy surrogate -- the logits at the positions that
   predict the target tokens given prompt + target -- and back-propagates it: every layer captures
   the gradient of the loss with respect to its output (so the Hybrid builder switches to SC, with the
   regression target moved against that gradient) and the per-layer gains take one L-BFGS-
   preconditioned step (`GainOptimizer`);
4. decodes again (greedy).

Targets and references. ``mode="self"`` (default) is gold-free: k sampled answers from the patched
model give a majority answer (at least two must agree); the surrogate target is that answer written
as ``#### <answer>`` and the verifier scores candidates against it (plus self-consistency with the
samples). Without a majority answer the target is the prompt's own tokens (a test-time
language-modelling loss, as SLOT adapts).
``mode="oracle"`` uses the gold answer as target and reference: an *oracle* run, labelled so in
every output, because it uses the label it is scored on.

Model weights never change; only the ephemeral policy state, captured gradients and gains do, and
they are reset at the start of every call.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .context import next_token_entropy
from .gains import GainOptimizer
from .patching import clear_gradients, is_patched, reset_state, set_entropy_hint, update_outcome
from .prompting import decode_new_tokens, encode, generation_kwargs
from .trace import summarize
from .verify import Answer, CompositeVerifier, extract_answer, parse_gold
from .verify.consistency import majority_answer

MODES = ("self", "oracle")


@dataclass
class RefineResult:
    """Outcome of `refine`: the best candidate by verifier loss and the per-iteration trace."""

    mode: str
    oracle: bool
    best_index: int
    best_text: str
    best_answer: Answer | None
    trace: list[dict[str, Any]]
    reference: str | None
    samples: list[str | None] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the answer as a dict)."""
        out = asdict(self)
        out["best_answer"] = None if self.best_answer is None else asdict(self.best_answer)
        return out


def refine(model: nn.Module, tokenizer: Any, prompt: str, gold: str | float | None = None, iters: int = 3,
           mode: str = "self", k_samples: int = 4, max_new_tokens: int = 256, seed: int = 0,
           verifier: CompositeVerifier | None = None, sample_temperature: float = 0.7) -> RefineResult:
    """Refine one answer to ``prompt`` (already formatted, e.g. by `chat_prompt`) over ``iters`` decodes."""
    if not is_patched(model):
        raise ValueError("refine needs a model patched with vps.patch(model, cfg)")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "oracle" and gold is None:
        raise ValueError("mode='oracle' needs gold (the label it is scored on)")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    if k_samples < 0:
        raise ValueError(f"k_samples must be >= 0, got {k_samples}")
    verifier = verifier if verifier is not None else CompositeVerifier()
    start = time.perf_counter()
    reset_state(model)
    gains = GainOptimizer(model)
    device = next(model.parameters()).device
    torch.manual_seed(seed)

    samples: list[Answer | None] = []
    sample_texts: list[str | None] = []
    tokens = 0
    if k_samples:
        texts, n, _ = _decode(model, tokenizer, [prompt] * k_samples, max_new_tokens, sample_temperature)
        tokens += sum(n)
        samples = [extract_answer(t) for t in texts]
        sample_texts = [None if a is None else a.text for a in samples]
    if mode == "oracle":
        reference: Answer | None = gold if isinstance(gold, Answer) else parse_gold(str(gold))
    else:
        majority, count = majority_answer(samples, verifier.rel_tol) if len(samples) >= 2 else (None, 0)
        # One vote is not a majority: without agreement the target falls back to the prompt's own tokens.
        reference = majority if count >= 2 else None
    target_ids = _target_ids(tokenizer, prompt, reference)

    trace: list[dict[str, Any]] = []
    prev_loss = math.inf
    for it in range(iters):
        t0 = time.perf_counter()
        row: dict[str, Any] = {"iter": it, "oracle": mode == "oracle"}
        if it > 0:
            row["surrogate"] = _surrogate_step(model, tokenizer, prompt, target_ids, gains, device)
        texts, n, first_logits = _decode(model, tokenizer, [prompt], max_new_tokens, 0.0)
        tokens += n[0]
        answer = extract_answer(texts[0])
        loss = verifier.compute_loss(answer, reference, samples if len(samples) >= 2 else None)
        total = _comparable(loss["total"])
        if it > 0:
            improved = total < prev_loss
            update_outcome(model, improved, prev_loss - total if math.isfinite(prev_loss - total) else 0.0)
            row["improved"] = improved
        entropy = float(next_token_entropy(first_logits[:, None, :])[0])
        set_entropy_hint(model, entropy)
        prev_loss = total
        row.update(
            text=texts[0], answer=None if answer is None else answer.text,
            number=None if answer is None else answer.number, tokens=n[0], entropy=entropy,
            loss={"total": loss["total"], "components": loss["components"], "no_evidence": loss["no_evidence"]},
            policy=summarize(model), mean_gain=float(gains.gains().mean()), seconds=time.perf_counter() - t0,
        )
        trace.append(row)
    clear_gradients(model)
    set_entropy_hint(model, None)

    best = min(range(len(trace)), key=lambda i: (_comparable(trace[i]["loss"]["total"]), i))
    return RefineResult(
        mode=mode, oracle=mode == "oracle", best_index=best, best_text=trace[best]["text"],
        best_answer=extract_answer(trace[best]["text"]), trace=trace,
        reference=None if reference is None else reference.text, samples=sample_texts,
        seconds=time.perf_counter() - start, tokens=tokens,
    )


def _comparable(total: float) -> float:
    # A loss without evidence is NaN; it must never count as an improvement or as the best.
    return total if isinstance(total, float) and math.isfinite(total) else math.inf


def _decode(model: nn.Module, tokenizer: Any, prompts: list[str], max_new_tokens: int, temperature: float
            ) -> tuple[list[str], list[int], torch.Tensor]:
    """Generate; also return the first step's logits (the next-token distribution after the prompt)."""
    enc = encode(tokenizer, prompts, next(model.parameters()).device)
    kwargs = generation_kwargs(tokenizer, max_new_tokens, temperature)
    with torch.no_grad():
        out = model.generate(**enc, **kwargs, return_dict_in_generate=True, output_logits=True)
    texts, counts = decode_new_tokens(tokenizer, out.sequences[:, enc["input_ids"].shape[1]:])
    return [t.strip() for t in texts], counts, out.logits[0].float()


def _target_ids(tokenizer: Any, prompt: str, reference: Answer | None) -> torch.Tensor | None:
    """Surrogate target tokens: '#### <answer>' after the prompt, or None for the prompt's own tokens."""
    if reference is None:
        return None
    ids = tokenizer(f"#### {reference.text}", add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    return ids if ids.numel() else None


def _surrogate_step(model: nn.Module, tokenizer: Any, prompt: str, target_ids: torch.Tensor | None,
                    gains: GainOptimizer, device: torch.device) -> dict[str, Any]:
    """Teacher-forced CE on the target (or the prompt itself), backward, then one gain step."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    if target_ids is None:
        seq, first = prompt_ids, 1  # every prompt token after the first predicts the next one
    else:
        seq, first = torch.cat([prompt_ids, target_ids]), prompt_ids.numel()
    seq = seq.to(device)[None]
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # gradients are needed for activations and gains only, never for weights
        p.requires_grad_(False)
    try:
        with gains.tracking(), torch.enable_grad():
            logits = model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits
            pred = logits[0, first - 1: seq.shape[1] - 1].float()
            loss = torch.nn.functional.cross_entropy(pred, seq[0, first:])
            loss.backward()
        info = gains.step()
    finally:
        for p in params:
            p.requires_grad_(True)
    info.update(loss=float(loss.detach()), target="answer" if target_ids is not None else "prompt",
                target_tokens=int(seq.shape[1] - first))
    return info
