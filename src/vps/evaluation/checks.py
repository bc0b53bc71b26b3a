"""Every check a run makes before it writes anything: its methods, settings and items (`check_run`), and what
the model will be asked (`preflight`).

A run that failed after writing its settings could not be rerun with a corrected value (the rerun is
refused as different settings), so everything that can be checked is checked first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..prompting import PromptFormat
from .data import Item
from .methods.registry import MethodSpec
from .methods.rows import gold
from .settings import RunSettings, SettingError

__all__ = ["check_items", "check_run", "model_context", "preflight"]


def check_items(items: Sequence[Item], specs: Sequence[MethodSpec]) -> None:
    """Refuse items a method cannot run on, before anything runs: oracle methods need every item's
    gold answer; item ids must be unique (a row is keyed by id and configuration). ValueError naming
    the items."""
    seen: set[str] = set()
    repeated: set[str] = set()
    for it in items:
        if it.id in seen:
            repeated.add(it.id)
        seen.add(it.id)
    duplicates = sorted(repeated)
    if duplicates:
        raise ValueError(f"item ids must be unique; repeated: {_some(duplicates)}")
    for spec in specs:
        if spec.oracle:
            missing = [it.id for it in items if gold(it)[0] is None]
            if missing:
                raise ValueError(f"{spec.name} needs each item's gold answer, and {len(missing)} item(s) have none: "
                                 f"{_some(missing)}; drop them from the data or run without {spec.name}")


def model_context(model: Any) -> int | None:
    """The most positions ``model`` takes (its config's ``max_position_embeddings`` or GPT-2's ``n_positions``),
    or None when its config states none."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def preflight(model: Any, tokenizer: Any, items: Sequence[Item], specs: Sequence[MethodSpec],
              settings: RunSettings) -> tuple[PromptFormat, dict[str, str]]:
    """Exercise every value the run will use, before anything is written: each item's prompt is built and
    encoded and fits the model's context with the tokens the run adds to it, and every patched configuration
    patches this model. A ValueError names the item or the configuration; without this a run wrote its
    settings, then failed (a 175k-token question against an 8,192 context ran for minutes first; a rank beyond
    the layers' size failed after the base rows), and the corrected rerun was refused as different settings.
    Returns the prompt format and every item's prompt, which the run then uses."""
    from ..patching import patched

    fmt = settings.prompt_format()
    context = model_context(model)
    n_answer = 0
    prompts: dict[str, str] = {}
    for it in items:
        try:
            prompt = prompts[it.id] = fmt.render(tokenizer, it.question)
            n = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
            if settings.nll and context is not None:
                n_answer = len(tokenizer(fmt.solution_prefix + it.answer, add_special_tokens=False)["input_ids"])
        except (UnicodeError, TypeError, ValueError) as exc:
            raise ValueError(f"item {it.id!r}: its prompt cannot be built or encoded ({exc})") from None
        if context is None:
            continue
        added = max(settings.max_new_tokens if settings.generate else 0, n_answer if settings.nll else 0)
        if n + added > context:
            parts = ((f"--max-new-tokens {settings.max_new_tokens}", settings.generate),
                     (f"its gold solution ({n_answer} tokens)", settings.nll))
            adds = " and ".join(part for part, on in parts if on)
            raise ValueError(f"item {it.id!r}: its prompt is {n:,} tokens, and {adds} take it beyond the model's "
                             f"context of {context:,} tokens; shorten the question, lower --max-new-tokens"
                             + (" or --shots" if settings.prompt == "fewshot" else ""))
    for spec in specs:
        if spec.patched:
            try:
                with patched(model, spec.config):
                    pass
            except ValueError as exc:
                raise ValueError(f"configuration {spec.name!r} cannot patch this model: {exc}") from None
    return fmt, prompts


def _some(ids: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(repr(i) for i in ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def check_run(items: Sequence[Item], specs: Sequence[MethodSpec], settings: RunSettings) -> None:
    """Every check `run_evaluation` makes of its methods, settings and items before writing anything."""
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"configuration names must be unique, got {names}")
    if not settings.generate and any(s.samples for s in specs):
        raise ValueError("refine and majority-vote methods generate; they cannot run in an NLL-only run")
    refining = [s.name for s in specs if s.refines]
    if refining and settings.refine_k_samples < 1:
        raise SettingError("refine_k_samples", f"refine_k_samples is {settings.refine_k_samples}, and "
                           f"{', '.join(refining)} would then skip self-consistency (no samples, no majority "
                           f"target); give at least 1 sample")
    check_items(items, specs)

