"""Teacher-forced negative log-likelihood of a gold solution given the prompt.

The metric is the mean NLL per token (nats) of the solution's tokens, each predicted from the
prompt and the solution tokens before it. It moves with small changes to the model that accuracy
on a weak model cannot show.

Honesty for a patched model: generation builds each layer's selectors from the *prompt* (the
prefill) and keeps them while decoding. Scoring the gold solution must do the same, or the
selectors would be built from the very tokens being scored. So a patched model is run twice: once
on the prompts alone (the prefill stores each layer's plan, per row), then on prompt + solution
inside `vps.reuse_selection`, which keeps those plans. ``selection="joint"`` builds the selectors
from prompt + solution instead; it exists only to measure the difference and is not used by the
harness.

A patched model can be scored two ways, equal up to float rounding: ``scoring="cached"`` (the
default) prefills the prompts with a KV cache and scores the solutions as one cached chunk, exactly
as generation decodes, so the prompt is computed once (~1.3x faster on GSM8K with SmolLM2);
``scoring="recompute"`` runs prompt + solution in one forward after the prompt-only prefill. An
unpatched model is always scored with one forward over prompt + solution.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..kv_cache import cache_argument, logits_to_keep_kwargs, output_cache
from ..patching import get_context, is_patched, reuse_selection

__all__ = ["NLLResult", "solution_nll"]

SELECTIONS = ("prompt", "joint")
SCORINGS = ("cached", "recompute")


@dataclass(frozen=True)
class NLLResult:
    """Mean NLL per solution token (None when the solution has no tokens) and the token count."""

    nll: float | None
    tokens: int


def _token_ids(tokenizer: Any, text: str) -> list[int]:
    # Same call as prompting.encode, so the prompt tokens equal the ones generation sees.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _left_padded(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Left-padded ids, mask and per-row positions (counted from each row's first valid token)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(list(row), dtype=torch.long)
            mask[i, width - len(row):] = 1
    # As generate() does: positions from the mask, so padding never shifts a row's positions.
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": positions.to(device)}


def _forward(model: Any, inputs: dict[str, Any], keep: int | None, use_cache: bool = False) -> tuple[torch.Tensor, Any]:
    """Logits of the last ``keep`` positions (None: all; every position is computed when the model
    cannot trim them), and the model's output (for its KV cache)."""
    kwargs: dict[str, Any] = dict(inputs, use_cache=use_cache)
    if keep is not None:
        kwargs.update(logits_to_keep_kwargs(model, keep))
    out = model(**kwargs)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return (logits if keep is None else logits[:, -keep:]), out


def solution_nll(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    solutions: Sequence[str],
    selection: str = "prompt",
    scoring: str = "cached",
) -> list[NLLResult]:
    """Mean NLL per token of each ``solutions[i]`` after ``prompts[i]``, teacher-forced, in one batch.

    A patched, enabled model keeps the selectors its prompt-only prefill built (``selection="prompt"``,
    the default), see the module docstring; ``scoring`` picks the cached or the recompute path.
    Rows are padded with per-row positions, so a row's result does not depend on its batch.
    """
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    if len(prompts) != len(solutions):
        raise ValueError(f"got {len(prompts)} prompts but {len(solutions)} solutions")
    if not prompts:
        return []
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    device = next(model.parameters()).device
    prompt_ids = [_token_ids(tokenizer, p) for p in prompts]
    solution_ids = [_token_ids(tokenizer, s) for s in solutions]
    if any(not p for p in prompt_ids):
        raise ValueError("a prompt encodes to no tokens; the first solution token would have no context")
    lengths = [len(s) for s in solution_ids]
    patched = is_patched(model) and get_context(model).enabled
    if not patched or selection == "joint" or max(lengths) == 0:
        # One forward over prompt + solution: all an unpatched model needs (a cached pass would only
        # add a second call), and what joint selection means.
        scoring = "recompute"

    with torch.no_grad():
        if scoring == "cached":
            logits, targets, starts = _cached_scores(model, prompt_ids, solution_ids, pad_id, device)
        else:
            logits, targets, starts = _recompute_scores(model, prompt_ids, solution_ids, pad_id, device,
                                                        patched and selection == "prompt")

    results: list[NLLResult] = []
    for i, n in enumerate(lengths):
        if n == 0:
            results.append(NLLResult(None, 0))
            continue
        row = logits[i, starts[i]: starts[i] + n].float()
        logp = torch.log_softmax(row, dim=-1)
        tgt = targets[i, starts[i] + 1: starts[i] + 1 + n]
        nll = -logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1).mean()
        results.append(NLLResult(float(nll), n))
    return results


# Both scorers return (logits, targets, starts): position starts[i] + j of row i predicts
# targets[i, starts[i] + j + 1], the solution's token j.

def _recompute_scores(model: Any, prompt_ids: list[list[int]], solution_ids: list[list[int]], pad_id: int,
                      device: torch.device, prompt_selection: bool) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    keep = max(len(s) for s in solution_ids) + 1
    joint = _left_padded([p + s for p, s in zip(prompt_ids, solution_ids, strict=True)], pad_id, device)
    if prompt_selection:
        # Prefill on the prompts alone stores each layer's per-row plan, as generation does...
        _forward(model, _left_padded(prompt_ids, pad_id, device), 1)
        # ...and the scoring pass keeps those plans instead of reading the solution tokens.
        with reuse_selection(model):
            logits = _forward(model, joint, keep)[0]
    else:
        logits = _forward(model, joint, keep)[0]
    # The window's last n + 1 positions: the last prompt token, then the solution's n tokens.
    starts = [keep - 1 - len(s) for s in solution_ids]
    return logits, joint["input_ids"][:, -keep:], starts


def _cached_scores(model: Any, prompt_ids: list[list[int]], solution_ids: list[list[int]], pad_id: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    prompt = _left_padded(prompt_ids, pad_id, device)
    first, out = _forward(model, prompt, 1, use_cache=True)  # predicts each solution's first token
    width = max(len(s) for s in solution_ids)
    # Solutions are right padded after the (left padded) prompts, so every row continues at its own
    # next position; a padded tail is masked out and only ever follows the valid tokens.
    chunk = torch.full((len(solution_ids), width), pad_id, dtype=torch.long)
    chunk_mask = torch.zeros((len(solution_ids), width), dtype=torch.long)
    for i, sol in enumerate(solution_ids):
        chunk[i, :len(sol)] = torch.tensor(sol, dtype=torch.long)
        chunk_mask[i, :len(sol)] = 1
    chunk, chunk_mask = chunk.to(device), chunk_mask.to(device)
    mask = torch.cat([prompt["attention_mask"], chunk_mask], dim=1)
    positions = prompt["attention_mask"].sum(dim=1, keepdim=True) + torch.arange(width, device=device)
    inputs = dict(input_ids=chunk, attention_mask=mask, position_ids=positions)
    inputs[cache_argument(model)] = output_cache(out)
    with reuse_selection(model):  # the selectors stay those of the prompt, whatever the decode mode
        rest = _forward(model, inputs, None, use_cache=True)[0]
    logits = torch.cat([first, rest], dim=1)
    targets = torch.cat([torch.full((len(solution_ids), 1), pad_id, dtype=torch.long, device=device), chunk], dim=1)
    return logits, targets, [0] * len(solution_ids)
