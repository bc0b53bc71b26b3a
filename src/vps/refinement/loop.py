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

import contextlib
import inspect
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import LogitsProcessor

from ..context import next_token_entropy
from ..patching import clear_gradients, get_config, is_patched, reset_state, set_entropy_hint, update_outcome
from ..prompting import generate_texts
from ..tracing import summarize, summarize_sequences
from ..verify import Answer, CompositeVerifier, extract_answer, parse_gold
from ..verify.consistency import majority_answer
from .checkpointing import checkpointed_blocks, decoder_blocks
from .config import RefineConfig
from .gains import GainOptimizer
from .progress import report_phase
from .samples import DrawnSamples, SampleCache, StreamSampler, settings_fingerprint

__all__ = [
    "RefineResult", "TraceRow", "check_call", "draw_samples", "pick_references", "refine", "refine_many",
    "score_candidate",
]

#: Sampled rows (prompts x k) one generate call draws at most; a larger batch is split over several calls
#: (`_draw`), so memory does not grow with batch x k. A batch of 8 at k = 4 or 8 is one call, as before.
MAX_SAMPLE_ROWS = 64


@dataclass
class TraceRow:
    """One iteration of one prompt's loop; `to_dict` is the row `RefineResult.trace` holds.

    ``surrogate`` (the gain step's record) and ``improved`` (whether this candidate's verifier loss
    beat the previous one's) are None at iteration 0, which takes no step; ``loss`` is the verifier's
    total, components and no_evidence. ``policy``, ``mean_gain`` and ``seconds`` (the iteration's wall
    time, shared by the batch) are filled in once the whole batch's iteration is done.
    """

    iter: int
    oracle: bool
    text: str
    answer: Answer | None
    tokens: int
    entropy: float
    loss: dict[str, Any]
    surrogate: dict[str, Any] | None = None
    improved: bool | None = None
    policy: dict[str, Any] = field(default_factory=dict)
    mean_gain: float = 1.0
    seconds: float = 0.0

    @property
    def total(self) -> float:
        """The loss total as candidates are compared: a total without evidence (NaN) counts as inf."""
        return _comparable(self.loss["total"])

    def to_dict(self) -> dict[str, Any]:
        """The trace row, keys in the order the loop has always written them."""
        row: dict[str, Any] = {"iter": self.iter, "oracle": self.oracle}
        if self.surrogate is not None:
            row.update(surrogate=self.surrogate, improved=self.improved)
        row.update(text=self.text, answer=None if self.answer is None else self.answer.text,
                   number=None if self.answer is None else self.answer.number, tokens=self.tokens,
                   entropy=self.entropy, loss=self.loss, policy=self.policy, mean_gain=self.mean_gain,
                   seconds=self.seconds)
        return row


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


def refine(model: nn.Module, tokenizer: Any, prompt: str, gold: str | float | None = None,
           config: RefineConfig | None = None, *, verifier: CompositeVerifier | None = None,
           **settings: Any) -> RefineResult:
    """Refine one answer to ``prompt`` (already formatted, e.g. by `chat_prompt`) over ``config.iters`` decodes.

    ``config`` (default `RefineConfig()`) holds the settings; `RefineConfig` fields given by keyword
    (``iters=2, mode="oracle"``, or ``sample_temperature`` for ``temperature``) override it.
    """
    return refine_many(model, tokenizer, [prompt], None if gold is None else [gold], config, verifier=verifier,
                       **settings)[0]


def refine_many(model: nn.Module, tokenizer: Any, prompts: Sequence[str], golds: Sequence[Any] | None = None,
                config: RefineConfig | None = None, *, verifier: CompositeVerifier | None = None,
                sample_cache: SampleCache | None = None, **settings: Any) -> list[RefineResult]:
    """`refine` for several prompts at once: each keeps its own loop, decoded and stepped as one batch.

    ``config`` and keyword ``settings`` as in `refine`. Every prompt's self-consistency samples come
    from its own random stream seeded with ``seed`` (as a lone `refine` call draws them; see the module
    docstring for ``sampling``); its policy history, gains and L-BFGS memory are its own (per-sequence
    state), so a prompt's result does not depend on the others beyond floating-point rounding. The
    samples, the greedy decodes and the surrogate steps run as batches, which is what makes this faster.
    With a ``sample_cache``, a prompt's samples drawn by an earlier call with the same settings are
    reused (see `SampleCache`).
    """
    config = RefineConfig.resolve(config, **settings)
    prompts = list(prompts)
    check_call(model, prompts, golds, config)
    verifier = verifier if verifier is not None else CompositeVerifier()
    start = time.perf_counter()

    fingerprint, drawn = draw_samples(model, tokenizer, prompts, config, sample_cache)
    samples = [d.answers for d in drawn]
    reset_state(model)
    gains = GainOptimizer(model, batch=None if len(prompts) == 1 else len(prompts))
    references = pick_references(config, golds, samples, verifier)
    targets = [_target_ids(tokenizer, p, r) for p, r in zip(prompts, references, strict=True)]
    traces = _iterate(model, tokenizer, prompts, targets, references, samples, gains, verifier, config)
    clear_gradients(model)
    set_entropy_hint(model, None)

    share = (time.perf_counter() - start) / len(prompts)
    return [_result(config, trace, reference, d, fingerprint, share)
            for trace, reference, d in zip(traces, references, drawn, strict=True)]


def check_call(model: nn.Module, prompts: Sequence[str], golds: Sequence[Any] | None, config: RefineConfig) -> None:
    """What `refine_many` refuses beyond an invalid `RefineConfig`: an unpatched model, no prompts, golds
    that do not match the prompts or are missing in oracle mode, a batch without per-sequence state, and
    ``checkpoint_activations`` on a model without decoder blocks to checkpoint (refused here, before the
    samples are drawn, not at the first refinement step)."""
    if not is_patched(model):
        raise ValueError("refine needs a model patched with vps.patch(model, cfg)")
    if not prompts:
        raise ValueError("refine_many needs at least one prompt")
    if golds is not None and len(golds) != len(prompts):
        raise ValueError(f"golds: {len(golds)} given for {len(prompts)} prompts")
    if config.oracle and (golds is None or any(g is None for g in golds)):
        raise ValueError("mode='oracle' needs gold (the label it is scored on)")
    if len(prompts) > 1 and get_config(model).scope != "sequence":
        raise ValueError("refining several prompts together needs scope='sequence' (per-sequence selectors)")
    if config.checkpoint_activations and config.iters > 1:
        decoder_blocks(model)  # a ValueError naming the model's class when it has none


def pick_references(config: RefineConfig, golds: Sequence[Any] | None, samples: Sequence[Sequence[Answer | None]],
                    verifier: CompositeVerifier) -> list[Answer | None]:
    """Each prompt's reference: its gold in oracle mode, else its samples' majority answer (None
    without one: then the surrogate target is the prompt's own tokens)."""
    references: list[Answer | None] = []
    for i, drawn in enumerate(samples):
        if config.oracle:
            assert golds is not None  # check_call: mode="oracle" needs golds
            gold = golds[i]
            references.append(gold if isinstance(gold, Answer) else parse_gold(str(gold)))
        else:
            majority, count = majority_answer(list(drawn), verifier.rel_tol) if len(drawn) >= 2 else (None, 0)
            # One vote is not a majority: without agreement the target falls back to the prompt's own tokens.
            references.append(majority if count >= 2 else None)
    return references


def _iterate(model: nn.Module, tokenizer: Any, prompts: list[str], targets: Sequence[torch.Tensor | None],
             references: Sequence[Answer | None], samples: Sequence[Sequence[Answer | None]], gains: GainOptimizer,
             verifier: CompositeVerifier, config: RefineConfig) -> list[list[TraceRow]]:
    """The loop's iterations over the batch (module docstring, steps 1-4); each prompt's trace."""
    b = len(prompts)
    device = next(model.parameters()).device
    traces: list[list[TraceRow]] = [[] for _ in range(b)]
    prev_loss = [math.inf] * b
    for it in range(config.iters):
        t0 = time.perf_counter()
        step = f"iteration {it + 1}/{config.iters}"
        if it > 0:
            report_phase(f"{step}: refinement step")
        surrogate = (_surrogate_step(model, tokenizer, prompts, targets, gains, device, config.checkpoint_activations)
                     if it > 0 else None)
        report_phase(f"{step}: decode")
        texts, n, first_logits = _decode(model, tokenizer, prompts, config.max_new_tokens, 0.0,
                                         stop_strings=config.stop_strings)
        entropy = next_token_entropy(first_logits[:, None, :])
        rows = [score_candidate(it, config.oracle, texts[i], n[i], float(entropy[i]), references[i], samples[i],
                                verifier, None if surrogate is None else surrogate[i], prev_loss[i],
                                config.extract_mode)
                for i in range(b)]
        totals = [row.total for row in rows]
        if surrogate is not None:
            deltas = [p - t if math.isfinite(p - t) else 0.0 for p, t in zip(prev_loss, totals, strict=True)]
            update_outcome(model, [bool(row.improved) for row in rows], deltas)
        set_entropy_hint(model, entropy)
        prev_loss = totals
        mean_gains = gains.gains().reshape(len(gains.layers), -1).mean(dim=0)
        policies = [summarize(model)] if b == 1 else summarize_sequences(model, b)
        took = time.perf_counter() - t0
        for i, row in enumerate(rows):
            row.policy, row.mean_gain, row.seconds = policies[i], float(mean_gains[i]), took
            traces[i].append(row)
    return traces


def score_candidate(it: int, oracle: bool, text: str, tokens: int, entropy: float, reference: Answer | None,
                    samples: Sequence[Answer | None], verifier: CompositeVerifier,
                    surrogate: dict[str, Any] | None, prev_loss: float, extract_mode: str = "flexible") -> TraceRow:
    """One decoded candidate, its answer read in ``extract_mode``, scored by the verifier against ``reference``
    (and the samples, given two or more); ``improved`` compares its loss with ``prev_loss`` after a surrogate
    step."""
    answer = extract_answer(text, extract_mode)
    loss = verifier.compute_loss(answer, reference, list(samples) if len(samples) >= 2 else None)
    row = TraceRow(iter=it, oracle=oracle, text=text, answer=answer, tokens=tokens, entropy=entropy,
                   loss={"total": loss["total"], "components": loss["components"],
                         "no_evidence": loss["no_evidence"]}, surrogate=surrogate)
    if surrogate is not None:
        row.improved = row.total < prev_loss
    return row


def _result(config: RefineConfig, trace: list[TraceRow], reference: Answer | None, drawn: DrawnSamples,
            fingerprint: str, seconds: float) -> RefineResult:
    """A prompt's `RefineResult`: the candidate with the lowest comparable loss, the earliest on a tie."""
    best = min(range(len(trace)), key=lambda j: (trace[j].total, j))
    return RefineResult(
        mode=config.mode, oracle=config.oracle, best_index=best, best_text=trace[best].text,
        best_answer=extract_answer(trace[best].text, config.extract_mode), trace=[row.to_dict() for row in trace],
        reference=None if reference is None else reference.text,
        samples=[None if a is None else a.text for a in drawn.answers], seconds=seconds,
        tokens=drawn.tokens + sum(row.tokens for row in trace),
        samples_reused=drawn.reused, reused_seconds=drawn.seconds if drawn.reused else 0.0,
        sample_record=drawn.to_record(fingerprint) if config.k_samples else None,
    )


def draw_samples(model: nn.Module, tokenizer: Any, prompts: Sequence[str], config: RefineConfig,
                 cache: SampleCache | None = None) -> tuple[str, list[DrawnSamples]]:
    """The settings' fingerprint, and each prompt's ``config.k_samples`` sampled completions, drawn from
    a fresh state (patched or not) or taken from ``cache``.

    These are the self-consistency samples of refinement: `refine_many` with the same settings on the same
    patched model draws (or reuses) exactly these, which is what makes a majority vote over them
    (``vps-maj@k``) a baseline at equal compute. On an unpatched model they are the base model's samples.
    """
    prompts = list(prompts)
    cache = cache if cache is not None else SampleCache()
    fingerprint = settings_fingerprint(config, get_config(model) if is_patched(model) else None)
    k = config.k_samples
    if not k:
        return fingerprint, [DrawnSamples([], 0, 0.0) for _ in prompts]
    cached = {i: cache.get(p, fingerprint) for i, p in enumerate(prompts)}
    found = {i: hit for i, hit in cached.items() if hit is not None}
    missing = [i for i, hit in cached.items() if hit is None]
    if missing:
        report_phase(f"sampling {k} per prompt")
        start = time.perf_counter()
        texts = _draw(model, tokenizer, [prompts[i] for i in missing], k, config.max_new_tokens, config.temperature,
                      config.seed, config.sampling, config.stop_strings)
        share = (time.perf_counter() - start) / len(missing)
        for i, (t, n) in zip(missing, texts, strict=True):
            found[i] = DrawnSamples([extract_answer(x, config.extract_mode) for x in t], sum(n), share, texts=list(t))
            cache.put(prompts[i], fingerprint, found[i])
    return fingerprint, [found[i] for i in range(len(prompts))]


def _draw(model: nn.Module, tokenizer: Any, prompts: list[str], k: int, max_new_tokens: int, temperature: float,
          seed: int, sampling: str, stop_strings: Sequence[str] = ()) -> list[tuple[list[str], list[int]]]:
    """Each prompt's k sampled texts and token counts."""
    fresh = reset_state if is_patched(model) else (lambda _m: None)
    if sampling == "streams":
        # Each prompt draws from its own stream, so splitting the prompts over several calls draws the same
        # samples; it keeps one call's rows (prompts x k) at most MAX_SAMPLE_ROWS (or k), whatever the batch.
        per_call = max(1, MAX_SAMPLE_ROWS // k)
        out = []
        for start in range(0, len(prompts), per_call):
            chunk = prompts[start:start + per_call]
            fresh(model)
            rows = [p for p in chunk for _ in range(k)]
            sampler = StreamSampler(len(chunk), k, temperature, seed, next(model.parameters()).device)
            texts, n, _ = _decode(model, tokenizer, rows, max_new_tokens, 0.0, processor=sampler,
                                  stop_strings=stop_strings)
            out += [(texts[i * k:(i + 1) * k], n[i * k:(i + 1) * k]) for i in range(len(chunk))]
        return out
    out = []
    for prompt in prompts:
        fresh(model)  # each prompt's samples start from a fresh state, as in a lone call
        torch.manual_seed(seed)
        texts, n, _ = _decode(model, tokenizer, [prompt] * k, max_new_tokens, temperature, stop_strings=stop_strings)
        out.append((texts, n))
    return out


def _comparable(total: float) -> float:
    # A loss without evidence is NaN; it must never count as an improvement or as the best.
    return total if isinstance(total, float) and math.isfinite(total) else math.inf


def _decode(model: nn.Module, tokenizer: Any, prompts: list[str], max_new_tokens: int, temperature: float,
            processor: LogitsProcessor | None = None, stop_strings: Sequence[str] = ()
            ) -> tuple[list[str], list[int], torch.Tensor]:
    """Generate; also return the first step's logits (the next-token distribution after the prompt)."""
    first = _FirstScores()
    # generate's output_logits would keep every step's logits: 512 steps x 32 rows x a 152k vocabulary
    # is 10 GB in float32, where only the first step is wanted.
    texts, counts = generate_texts(model, tokenizer, prompts, max_new_tokens, temperature, stop_strings=stop_strings,
                                   logits_processors=[first] + ([processor] if processor is not None else []))
    assert first.scores is not None  # generate runs at least one step (it refuses max_new_tokens < 1)
    return texts, counts, first.scores


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


def _keeps_logits(model: nn.Module) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (HuggingFace causal LMs: the last N positions)."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def _surrogate_step(model: nn.Module, tokenizer: Any, prompts: Sequence[str],
                    targets: Sequence[torch.Tensor | None], gains: GainOptimizer, device: torch.device,
                    checkpoint: bool = False) -> list[dict[str, Any]]:
    """Teacher-forced CE on each target (or the prompt itself), backward, then one gain step per sequence;
    with ``checkpoint`` the decoder blocks' activations are recomputed in the backward, not kept
    (`vps.refinement.checkpointing`).

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
        # Only the positions from the earliest target on are scored: the vocabulary-wide logits of the
        # prompt's other positions (and their gradient's zeros) would be the step's largest single tensors.
        lo = min(firsts) - 1 if _keeps_logits(model) else 0
        kwargs: dict[str, Any] = {"logits_to_keep": width - lo} if lo > 0 else {}
        blocks: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        if checkpoint:
            blocks = checkpointed_blocks(model)
            kwargs["use_cache"] = False  # a recomputed block would write its keys and values again
        with gains.tracking(), torch.enable_grad(), blocks:
            logits = model(input_ids=ids, attention_mask=mask, **kwargs).logits
            losses = []
            for i, (seq, first) in enumerate(zip(seqs, firsts, strict=True)):
                pred = logits[i, first - 1 - lo: seq.numel() - 1 - lo].float()
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
