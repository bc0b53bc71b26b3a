"""``refine-self`` and ``refine-oracle``: the verify-and-refine loop (`vps.refinement.refine_many`) per batch.

Both run the loop on the patched model with the run's `RunSettings.refine_config`; ``refine-oracle`` alone
receives the gold answers, so it is an oracle method and its rows say ``oracle=true``. A row's ``output`` is
the text the loop chose, read like every method's in the run's extraction mode; it adds ``refine``, the
loop's trace (which records the self-consistency samples, so a resumed run reuses them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ...verify import extract_answer
from ..data import Item
from .registry import BatchRunner, Method, MethodSpec, RunContext, register
from .rows import gold, new_row, score

__all__ = ["refine_batch", "refine_passes"]


def _default_refine() -> Callable[..., Any]:
    try:
        from ...refinement.loop import refine_many
    except ImportError as exc:
        raise RuntimeError(f"refine methods need vps.refinement, which cannot be imported: {exc}") from None
    return refine_many


def refine_batch(model: Any, tokenizer: Any, batch: Sequence[Item], spec: MethodSpec, prompts: dict[str, str],
                 settings: Any, refine_fn: Callable[..., Any], clock: Callable[[], float],
                 sample_cache: Any, checkpoint_activations: bool = False) -> list[dict[str, Any]]:
    """Refine the batch's items together; the oracle mode alone receives the gold answers.

    Methods that draw the same self-consistency samples (refine-self and refine-oracle of one
    configuration) share them through ``sample_cache``; a row that reuses samples adds what drawing
    them cost to its seconds, so its cost stays that of the whole method.
    """
    from ...patching import reset_state

    golds = [gold(it)[0] for it in batch]
    if spec.oracle:
        for it, value in zip(batch, golds, strict=True):
            if value is None:
                raise ValueError(f"item {it.id}: refine-oracle needs a gold answer and this item has none")
    reset_state(model)
    start = clock()
    config = settings.refine_config(mode="oracle" if spec.oracle else "self",
                                    checkpoint_activations=checkpoint_activations)
    results = refine_fn(model, tokenizer, [prompts[it.id] for it in batch], golds if spec.oracle else None,
                        config=config, sample_cache=sample_cache)
    share = (clock() - start) / len(batch)  # the batch's wall time divided among its items
    if len(results) != len(batch):
        raise RuntimeError(f"{spec.name}: refine returned {len(results)} results for {len(batch)} items")
    rows = []
    for it, result in zip(batch, results, strict=True):
        if bool(getattr(result, "oracle", False)) != spec.oracle:
            raise RuntimeError(f"{spec.name}: refine returned oracle={getattr(result, 'oracle', None)} for a "
                               f"{'oracle' if spec.oracle else 'gold-free'} run")
        row = new_row(it, spec, prompts[it.id], len(batch))
        # The final text is read as every method's output is, in the run's extraction mode; the
        # loop's own reading (flexible) only chose which iteration's text that is.
        score(row, it, result.best_text, extract_answer(result.best_text, settings.extract_mode))
        row.update(tokens=int(result.tokens), seconds=share + float(getattr(result, "reused_seconds", 0.0)),
                   refine=result.to_dict())
        row["oracle"] = spec.oracle
        rows.append(row)
    return rows


def _start(ctx: RunContext, spec: MethodSpec) -> BatchRunner:
    # Resolved once per configuration, before its first batch: a missing vps.refinement fails here, not mid-run.
    refine = ctx.refine_fn if ctx.refine_fn is not None else _default_refine()
    return lambda batch: refine_batch(ctx.model, ctx.tokenizer, batch, spec, ctx.prompts, ctx.settings, refine,
                                      ctx.clock, ctx.sample_cache, ctx.checkpoint_activations)


def refine_passes(row: dict[str, Any]) -> tuple[int, int] | None:
    """A refine row's (forward, backward) passes: one forward per token it generated (self-consistency samples and
    every iteration's decode, `generation_passes`), plus one forward and one backward for each iteration after the
    first, whose surrogate step back-propagates through the prompt and its target."""
    tokens, trace = row.get("tokens"), (row.get("refine") or {}).get("trace")
    if not isinstance(tokens, int) or not isinstance(trace, list):
        return None
    steps = sum(1 for entry in trace if isinstance(entry, dict) and entry.get("surrogate") is not None)
    return tokens + steps, steps


_TRAITS: dict[str, Any] = dict(patched=True, samples=True, refines=True, row_fields=("refine",), sample_field="refine",
                               rescore_note="refine rows keep the candidate their loop chose", passes=refine_passes)
register(Method("refine-self", _start, **_TRAITS))
register(Method("refine-oracle", _start, oracle=True, **_TRAITS))
