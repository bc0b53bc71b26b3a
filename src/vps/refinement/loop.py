"""Iterative refinement with the verifier in the loop (docs/design.md §6).

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

`refine_many` runs the loop for several prompts as one batch: the greedy decodes and the surrogate
steps are batched, while every prompt keeps its own samples, policy history, gains and L-BFGS memory,
so its result matches a lone `refine` call up to floating-point rounding (tested), at a fraction of
the time on hardware where a batch of B costs far less than B single decodes.

Sampling. ``sampling="streams"`` (default) draws all prompts' self-consistency samples in one batch;
each prompt's rows take their randomness from their own generator seeded with ``seed`` (Gumbel-max:
the argmax of ``logits / T`` plus Gumbel noise is an exact draw from ``softmax(logits / T)``), so a
prompt's samples are the same whether it is refined alone or with others. ``sampling="global"`` is the
earlier scheme: one prompt at a time, ``torch.manual_seed(seed)`` and `generate`'s own sampler. With
torch 2.13 the two give the same draws for a lone prompt (`torch.multinomial` draws one sample by the
same exponential race from the same generator; tested), so "global" is kept only to reproduce earlier
runs exactly should that ever change.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import torch
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList

from ..context import next_token_entropy
from ..patching import clear_gradients, get_config, is_patched, reset_state, set_entropy_hint, update_outcome
from ..prompting import check_context, decode_new_tokens, encode, generation_kwargs
from ..tracing import summarize, summarize_sequences
from ..verify import Answer, CompositeVerifier, extract_answer, parse_gold
from ..verify.consistency import majority_answer
from .gains import GainOptimizer
from .samples import DrawnSamples, SampleCache, StreamSampler, settings_fingerprint

MODES = ("self", "oracle")
SAMPLINGS = ("streams", "global")
SAMPLE_TEMPERATURE = 0.7  # of the self-consistency samples (and of the maj@k baselines that vote over them)


@dataclass
class RefineResult:
    """Outcome of `refine`: the best candidate by verifier loss and the per-iteration trace.

    ``seconds`` is this call's wall time (its share, from `refine_many`); ``tokens`` counts every
    token generated for the prompt, its samples included. ``samples_reused`` says the samples came from
    a `SampleCache`; ``reused_seconds`` is what drawing them cost then, which ``seconds`` excludes.
    ``sample_record`` holds the samples in full (`DrawnSamples.to_record`), so a later run can restore
    them into a cache (`SampleCache.restore`); None without samples.
    """

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
    samples_reused: bool = False
    reused_seconds: float = 0.0
    sample_record: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the answer as a dict)."""
        out = asdict(self)
        out["best_answer"] = None if self.best_answer is None else asdict(self.best_answer)
        return out


def refine(model: nn.Module, tokenizer: Any, prompt: str, gold: str | float | None = None, iters: int = 3,
           mode: str = "self", k_samples: int = 4, max_new_tokens: int = 256, seed: int = 0,
           verifier: CompositeVerifier | None = None, sample_temperature: float = SAMPLE_TEMPERATURE,
           sampling: str = "streams") -> RefineResult:
    """Refine one answer to ``prompt`` (already formatted, e.g. by `chat_prompt`) over ``iters`` decodes."""
    return refine_many(model, tokenizer, [prompt], None if gold is None else [gold], iters=iters, mode=mode,
                       k_samples=k_samples, max_new_tokens=max_new_tokens, seed=seed, verifier=verifier,
                       sample_temperature=sample_temperature, sampling=sampling)[0]


def refine_many(model: nn.Module, tokenizer: Any, prompts: Sequence[str], golds: Sequence[Any] | None = None,
                iters: int = 3, mode: str = "self", k_samples: int = 4, max_new_tokens: int = 256, seed: int = 0,
                verifier: CompositeVerifier | None = None, sample_temperature: float = SAMPLE_TEMPERATURE,
                sampling: str = "streams", sample_cache: SampleCache | None = None) -> list[RefineResult]:
    """`refine` for several prompts at once: each keeps its own loop, decoded and stepped as one batch.

    Every prompt's self-consistency samples come from its own random stream seeded with ``seed`` (as a
    lone `refine` call draws them; see the module docstring for ``sampling``); its policy history,
    gains and L-BFGS memory are its own (per-sequence state), so a prompt's result does not depend on
    the others beyond floating-point rounding. The samples, the greedy decodes and the surrogate steps
    run as batches, which is what makes this faster. With a ``sample_cache``, a prompt's samples
    drawn by an earlier call with the same settings are reused (see `SampleCache`).
    """
    if not is_patched(model):
        raise ValueError("refine needs a model patched with vps.patch(model, cfg)")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("refine_many needs at least one prompt")
    if golds is not None and len(golds) != len(prompts):
        raise ValueError(f"golds: {len(golds)} given for {len(prompts)} prompts")
    if mode == "oracle" and (golds is None or any(g is None for g in golds)):
        raise ValueError("mode='oracle' needs gold (the label it is scored on)")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    if k_samples < 0:
        raise ValueError(f"k_samples must be >= 0, got {k_samples}")
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    if k_samples and not sample_temperature > 0:
        raise ValueError(f"sample_temperature must be > 0 to draw samples, got {sample_temperature}")
    b = len(prompts)
    if b > 1 and get_config(model).scope != "sequence":
        raise ValueError("refining several prompts together needs scope='sequence' (per-sequence selectors)")
    verifier = verifier if verifier is not None else CompositeVerifier()
    start = time.perf_counter()
    device = next(model.parameters()).device

    fingerprint, drawn = draw_samples(model, tokenizer, prompts, k_samples, max_new_tokens, sample_temperature, seed,
                                      sampling, sample_cache)
    samples = [d.answers for d in drawn]
    tokens = [d.tokens for d in drawn]
    reset_state(model)
    gains = GainOptimizer(model, batch=None if b == 1 else b)

    references: list[Answer | None] = []
    for i in range(b):
        if mode == "oracle":
            assert golds is not None  # checked above: mode="oracle" needs golds
            gold = golds[i]
            references.append(gold if isinstance(gold, Answer) else parse_gold(str(gold)))
        else:
            majority, count = (majority_answer(samples[i], verifier.rel_tol) if len(samples[i]) >= 2
                               else (None, 0))
            # One vote is not a majority: without agreement the target falls back to the prompt's own tokens.
            references.append(majority if count >= 2 else None)
    targets = [_target_ids(tokenizer, p, r) for p, r in zip(prompts, references, strict=True)]

    traces: list[list[dict[str, Any]]] = [[] for _ in range(b)]
    prev_loss = [math.inf] * b
    for it in range(iters):
        t0 = time.perf_counter()
        surrogate = _surrogate_step(model, tokenizer, prompts, targets, gains, device) if it > 0 else None
        texts, n, first_logits = _decode(model, tokenizer, prompts, max_new_tokens, 0.0)
        entropy = next_token_entropy(first_logits[:, None, :])
        totals, improved, rows = [], [], []
        for i in range(b):
            tokens[i] += n[i]
            answer = extract_answer(texts[i])
            loss = verifier.compute_loss(answer, references[i], samples[i] if len(samples[i]) >= 2 else None)
            total = _comparable(loss["total"])
            row: dict[str, Any] = {"iter": it, "oracle": mode == "oracle"}
            if surrogate is not None:
                row["surrogate"] = surrogate[i]
                improved.append(total < prev_loss[i])
                row["improved"] = improved[-1]
            totals.append(total)
            row.update(text=texts[i], answer=None if answer is None else answer.text,
                       number=None if answer is None else answer.number, tokens=n[i], entropy=float(entropy[i]),
                       loss={"total": loss["total"], "components": loss["components"],
                             "no_evidence": loss["no_evidence"]})
            rows.append(row)
        if surrogate is not None:
            deltas = [p - t if math.isfinite(p - t) else 0.0 for p, t in zip(prev_loss, totals, strict=True)]
            update_outcome(model, improved, deltas)
        set_entropy_hint(model, entropy)
        prev_loss = totals
        mean_gains = gains.gains().reshape(len(gains.layers), -1).mean(dim=0)
        policies = [summarize(model)] if b == 1 else summarize_sequences(model, b)
        took = time.perf_counter() - t0
        for i, row in enumerate(rows):
            row.update(policy=policies[i], mean_gain=float(mean_gains[i]), seconds=took)
            traces[i].append(row)
    clear_gradients(model)
    set_entropy_hint(model, None)

    seconds = time.perf_counter() - start
    results = []
    for i in range(b):
        trace, reference = traces[i], references[i]
        best = min(range(len(trace)), key=lambda j: (_comparable(trace[j]["loss"]["total"]), j))
        results.append(RefineResult(
            mode=mode, oracle=mode == "oracle", best_index=best, best_text=trace[best]["text"],
            best_answer=extract_answer(trace[best]["text"]), trace=trace,
            reference=None if reference is None else reference.text,
            samples=[None if a is None else a.text for a in samples[i]], seconds=seconds / b, tokens=tokens[i],
            samples_reused=drawn[i].reused, reused_seconds=drawn[i].seconds if drawn[i].reused else 0.0,
            sample_record=drawn[i].to_record(fingerprint) if k_samples else None,
        ))
    return results


def draw_samples(model: nn.Module, tokenizer: Any, prompts: Sequence[str], k: int, max_new_tokens: int = 256,
                 temperature: float = SAMPLE_TEMPERATURE, seed: int = 0, sampling: str = "streams",
                 cache: SampleCache | None = None) -> tuple[str, list[DrawnSamples]]:
    """The settings' fingerprint, and each prompt's ``k`` sampled completions, drawn from a fresh state
    (patched or not) or taken from ``cache``.

    These are the self-consistency samples of refinement: `refine_many` with the same settings on the same
    patched model draws (or reuses) exactly these, which is what makes a majority vote over them
    (``vps-maj@k``) a baseline at equal compute. On an unpatched model they are the base model's samples.
    """
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    if k and not temperature > 0:
        raise ValueError(f"temperature must be > 0 to draw samples, got {temperature}")
    prompts = list(prompts)
    cache = cache if cache is not None else SampleCache()
    config = get_config(model) if is_patched(model) else None
    fingerprint = settings_fingerprint(k, max_new_tokens, temperature, seed, sampling, config)
    if not k:
        return fingerprint, [DrawnSamples([], 0, 0.0) for _ in prompts]
    cached = {i: cache.get(p, fingerprint) for i, p in enumerate(prompts)}
    found = {i: hit for i, hit in cached.items() if hit is not None}
    missing = [i for i, hit in cached.items() if hit is None]
    if missing:
        start = time.perf_counter()
        texts = _draw(model, tokenizer, [prompts[i] for i in missing], k, max_new_tokens, temperature, seed, sampling)
        share = (time.perf_counter() - start) / len(missing)
        for i, (t, n) in zip(missing, texts, strict=True):
            found[i] = DrawnSamples([extract_answer(x) for x in t], sum(n), share, texts=list(t))
            cache.put(prompts[i], fingerprint, found[i])
    return fingerprint, [found[i] for i in range(len(prompts))]


def _draw(model: nn.Module, tokenizer: Any, prompts: list[str], k: int, max_new_tokens: int, temperature: float,
          seed: int, sampling: str) -> list[tuple[list[str], list[int]]]:
    """Each prompt's k sampled texts and token counts."""
    fresh = reset_state if is_patched(model) else (lambda _m: None)
    if sampling == "streams":
        fresh(model)
        rows = [p for p in prompts for _ in range(k)]
        sampler = StreamSampler(len(prompts), k, temperature, seed, next(model.parameters()).device)
        texts, n, _ = _decode(model, tokenizer, rows, max_new_tokens, 0.0, processor=sampler)
        return [(texts[i * k:(i + 1) * k], n[i * k:(i + 1) * k]) for i in range(len(prompts))]
    out = []
    for prompt in prompts:
        fresh(model)  # each prompt's samples start from a fresh state, as in a lone call
        torch.manual_seed(seed)
        texts, n, _ = _decode(model, tokenizer, [prompt] * k, max_new_tokens, temperature)
        out.append((texts, n))
    return out


def _comparable(total: float) -> float:
    # A loss without evidence is NaN; it must never count as an improvement or as the best.
    return total if isinstance(total, float) and math.isfinite(total) else math.inf


def _decode(model: nn.Module, tokenizer: Any, prompts: list[str], max_new_tokens: int, temperature: float,
            processor: LogitsProcessor | None = None) -> tuple[list[str], list[int], torch.Tensor]:
    """Generate; also return the first step's logits (the next-token distribution after the prompt)."""
    enc = encode(tokenizer, prompts, next(model.parameters()).device)
    check_context(model, enc["input_ids"], max_new_tokens)
    kwargs = generation_kwargs(tokenizer, max_new_tokens, temperature)
    first = _FirstScores()
    # generate's output_logits would keep every step's logits: 512 steps x 32 rows x a 152k vocabulary
    # is 10 GB in float32, where only the first step is wanted.
    kwargs["logits_processor"] = LogitsProcessorList([first] + ([processor] if processor is not None else []))
    with torch.no_grad():
        out = cast(Any, model).generate(**enc, **kwargs)  # a HuggingFace model (nn.Module has no generate)
    texts, counts = decode_new_tokens(tokenizer, out[:, enc["input_ids"].shape[1]:])
    assert first.scores is not None  # generate runs at least one step (it refuses max_new_tokens < 1)
    return [t.strip() for t in texts], counts, first.scores


class _FirstScores(LogitsProcessor):
    """Keeps the logits of generate's first step and changes nothing."""

    def __init__(self) -> None:
        self.scores: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.scores is None:
            self.scores = scores.detach().float().clone()
        return scores


def _target_ids(tokenizer: Any, prompt: str, reference: Answer | None) -> torch.Tensor | None:
    """Surrogate target tokens: '#### <answer>' after the prompt, or None for the prompt's own tokens."""
    if reference is None:
        return None
    ids = tokenizer(f"#### {reference.text}", add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    return ids if ids.numel() else None


def _surrogate_step(model: nn.Module, tokenizer: Any, prompts: Sequence[str],
                    targets: Sequence[torch.Tensor | None], gains: GainOptimizer, device: torch.device
                    ) -> list[dict[str, Any]]:
    """Teacher-forced CE on each target (or the prompt itself), backward, then one gain step per sequence.

    The sequences are right-padded into one batch: padding comes after every real token, so no real
    token attends to it, and the VPS statistics skip it through the attention mask. The loss is the sum
    of the sequences' mean cross-entropies, so each sequence's gains get its own loss's gradient.
    """
    seqs, firsts = [], []
    for prompt, target_ids in zip(prompts, targets, strict=True):
        prompt_ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        if target_ids is None:
            seqs.append(prompt_ids)
            firsts.append(1)  # every prompt token after the first predicts the next one
        else:
            seqs.append(torch.cat([prompt_ids, target_ids]))
            firsts.append(prompt_ids.numel())
    width = max(s.numel() for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, seq in enumerate(seqs):
        ids[i, : seq.numel()] = seq
        mask[i, : seq.numel()] = 1
    ids, mask = ids.to(device), mask.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # gradients are needed for activations and gains only, never for weights
        p.requires_grad_(False)
    try:
        with gains.tracking(), torch.enable_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
            losses = []
            for i, (seq, first) in enumerate(zip(seqs, firsts, strict=True)):
                pred = logits[i, first - 1: seq.numel() - 1].float()
                losses.append(torch.nn.functional.cross_entropy(pred, ids[i, first: seq.numel()]))
            torch.stack(losses).sum().backward()
        steps = gains.step()
    finally:
        for p in params:
            p.requires_grad_(True)
    steps = steps if isinstance(steps, list) else [steps]
    for info, loss, seq, first, target_ids in zip(steps, losses, seqs, firsts, targets, strict=True):
        info.update(loss=float(loss.detach()), target="answer" if target_ids is not None else "prompt",
                    target_tokens=int(seq.numel() - first))
    return steps
