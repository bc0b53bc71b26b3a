"""``maj@K`` and ``vps-maj@K``: a majority vote over K sampled completions per item (unpatched / patched).

The samples are refinement's self-consistency samples (same temperature, seed, streams and cache), so next
to ``refine-self`` with K samples, ``vps-maj@K`` votes over exactly the samples refinement drew and costs
nothing more. A row adds ``vote``: K, the winner's votes, every sample's answer, the tie rule, whether the
samples were reused, and the record of the samples (from which a resumed run restores them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ...verify import extract_answer
from ..data import Item
from .registry import BatchRunner, Method, MethodSpec, RunContext, register
from .rows import new_row, score

__all__ = ["VOTE_TIE_RULE", "vote_batch"]

# The stated, deterministic tie rule of the majority-vote methods.
VOTE_TIE_RULE = "most votes (answers equal within the verifier's tolerance); a tie goes to the answer sampled first"


def vote_batch(model: Any, tokenizer: Any, batch: Sequence[Item], spec: MethodSpec, prompts: dict[str, str],
               settings: Any, sample_cache: Any) -> list[dict[str, Any]]:
    """``maj@k`` / ``vps-maj@k``: a majority vote over k sampled completions per item.

    A row's seconds are what drawing its samples cost, reused or not. The row's output is the first sample
    carrying the winning answer, read in the run's extraction mode.
    """
    from ...refinement.loop import draw_samples
    from ...verify import CompositeVerifier
    from ...verify.consistency import majority_answer

    assert spec.votes is not None  # a vote method's spec always has votes (MethodSpec checks it)
    config = settings.refine_config(k_samples=spec.votes)
    fingerprint, drawn = draw_samples(model, tokenizer, [prompts[it.id] for it in batch], config, sample_cache)
    rel_tol = CompositeVerifier().rel_tol
    rows = []
    for it, d in zip(batch, drawn, strict=True):
        winner, count = majority_answer(d.answers, rel_tol)
        row = new_row(it, spec, prompts[it.id], len(batch))
        if winner is None:
            score(row, it, d.texts[0] if d.texts else "", None)
        elif d.texts is not None:
            chosen = d.texts[d.answers.index(winner)]
            score(row, it, chosen, extract_answer(chosen, settings.extract_mode))
        else:  # samples restored from a record written before texts were kept
            score(row, it, winner.text, winner)
        row.update(tokens=int(d.tokens), seconds=float(d.seconds), vote={
            "k": spec.votes, "winner_votes": count, "answers": [None if a is None else a.text for a in d.answers],
            "tie_rule": VOTE_TIE_RULE, "samples_reused": d.reused, "sample_record": d.to_record(fingerprint)})
        rows.append(row)
    return rows


def report_lines(entries: Sequence[dict[str, Any]]) -> list[str]:
    """report.md's note on the vote configurations (``entries``: their summary entries, in the run's order)."""
    names = ", ".join(f"`{e['name']}`" for e in entries)
    return [f"- **Majority vote**: {names} answer with the majority of k completions sampled at "
            "refinement's temperature and seeds (`maj` unpatched, `vps-maj` patched; next to `refine-self` "
            "the same samples, reused); a tie goes to the answer sampled first; compare them at equal "
            "compute by tokens/item below"]


def _start(ctx: RunContext, spec: MethodSpec) -> BatchRunner:
    return lambda batch: vote_batch(ctx.model, ctx.tokenizer, batch, spec, ctx.prompts, ctx.settings,
                                    ctx.sample_cache)


_TRAITS: dict[str, Any] = dict(votes=True, samples=True, row_fields=("vote",), sample_field="vote",
                               report_lines=report_lines, rescore_note="vote rows keep the sample their vote chose")
register(Method("maj", _start, patched=False, **_TRAITS))
register(Method("vps-maj", _start, patched=True, **_TRAITS))
