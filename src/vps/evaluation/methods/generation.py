"""``base`` and ``vps``: one decoding per item (greedy by default), scored, and the gold solution's NLL.

Both run the same batch; ``base`` runs the unpatched model, ``vps`` the model patched with its configuration.
A ``vps`` row adds ``fallbacks``: the plans of that item that fell back to the base output, summed over
layers and forwards (rows written before it was recorded lack it). In an NLL-only run a row's ``seconds``
is the NLL pass's share.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ...verify import extract_answer
from ..data import Item
from .registry import BatchRunner, Method, MethodSpec, RunContext, register
from .rows import finite, new_row, score

__all__ = ["generation_batch"]


def generation_batch(model: Any, tokenizer: Any, batch: Sequence[Item], spec: MethodSpec, prompts: dict[str, str],
                     settings: Any, generate_fn: Callable[..., Any], clock: Callable[[], float],
                     solution_prefix: str = "") -> list[dict[str, Any]]:
    """One batch of base or vps: batched generation, then the gold-solution NLL.

    Patched state (policy history, stored plans) is reset before each pass, so a row does not depend on
    which batches ran before it.
    """
    from ...patching import reset_state
    from ..nll import solution_nll

    texts = [prompts[it.id] for it in batch]
    rows = [new_row(it, spec, prompts[it.id], len(batch)) for it in batch]
    fallbacks = [0] * len(batch)
    if settings.generate:
        if spec.patched:
            reset_state(model)
        start = clock()
        with _counting_fallbacks(model, spec, len(batch), fallbacks):
            outputs, counts = generate_fn(model, tokenizer, texts, max_new_tokens=settings.max_new_tokens,
                                          temperature=settings.temperature, seed=settings.seed,
                                          stop_strings=settings.stop_strings)
        share = (clock() - start) / len(batch)
        for row, it, out, n in zip(rows, batch, outputs, counts, strict=True):
            score(row, it, out, extract_answer(out, settings.extract_mode))
            row.update(tokens=int(n), seconds=share)
    if settings.nll:
        if spec.patched:
            reset_state(model)
        start = clock()
        with _counting_fallbacks(model, spec, len(batch), fallbacks):
            scores = solution_nll(model, tokenizer, texts, [solution_prefix + it.answer for it in batch])
        share = (clock() - start) / len(batch)
        for row, s in zip(rows, scores, strict=True):
            row.update(nll=finite(s.nll), nll_tokens=s.tokens, nll_seconds=share)
            if not settings.generate:
                row["seconds"] = share
    if spec.patched:
        for row, n in zip(rows, fallbacks, strict=True):
            row["fallbacks"] = n
    return rows


@contextlib.contextmanager
def _counting_fallbacks(model: Any, spec: MethodSpec, batch: int, into: list[int]) -> Iterator[None]:
    """For a patched spec, add each item's fallbacks to the base output (`vps.tracing.count_fallbacks`)
    in the block to ``into``; nothing for the unpatched model."""
    if not spec.patched:
        yield
        return
    from ...tracing import count_fallbacks

    with count_fallbacks(model, batch) as count:
        yield
    for i, n in enumerate(count.per_sequence):
        into[i] += n


def _start(ctx: RunContext, spec: MethodSpec) -> BatchRunner:
    return lambda batch: generation_batch(ctx.model, ctx.tokenizer, batch, spec, ctx.prompts, ctx.settings,
                                          ctx.generate_fn, ctx.clock, ctx.solution_prefix)


register(Method("base", _start, patched=False))
register(Method("vps", _start, patched=True, row_fields=("fallbacks",)))
