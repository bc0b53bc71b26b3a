"""Run methods over evaluation items, one JSONL row per item and method, resumable.

An output directory holds ``run.json`` (the run's settings) and ``results.jsonl`` (append-only,
one row per (item id, config name), written, flushed and fsynced as each batch completes). A rerun
with the same directory skips the rows already there, so an interruption loses at most the batch
in flight; a final line cut off mid-write is dropped with a warning. A rerun whose settings differ
(model, data, sample, decoding, a config's overrides) is refused rather than mixing results; new
configurations may be added to a directory. One process at a time works in a directory: a run holds
the lock ``<dir>/.lock`` (`RunDir.lock`) from start to finish, and a second is refused. Every setting
and every item is checked (`RunSettings`, `check_run`) before anything is written. A data-parallel run
(``shard``, `vps.evaluation.distributed`) has each rank write its share of the items to its own rows
file, and rank 0 merges them into ``results.jsonl`` once every rank is done.

Every file is strict JSON: a number that is not finite (NaN, inf) is written as ``null``, which
means "no value" - e.g. a refine trace's loss ``total`` when no verifier component had evidence.

Row schema (keys always present; None where not applicable):
``id``, ``index`` (line in the source file), ``config`` (the row's label, unique in the run),
``method`` (base | vps | refine-self | refine-oracle), ``oracle`` (True when the gold answer was
used at test time), ``prompt``, ``output`` (for refine methods, the text the loop chose),
``pred`` / ``pred_number`` / ``pred_source`` (the answer read from ``output`` in the run's
extraction mode, for every method alike), ``gold`` (number, or text for a non-numeric gold) and ``gold_text``,
``correct``, ``tokens`` (generated), ``seconds`` (this item's share of its batch's wall time for
generation, or for the NLL pass in NLL-only runs), ``nll`` (mean NLL per gold-solution token),
``nll_tokens``, ``nll_seconds``, ``batch_size``; refine rows add ``refine`` (the loop's trace); rows of a
patched base-or-vps configuration add ``fallbacks`` (plans of that item that fell back to the base output,
summed over layers and forwards; rows written before it was recorded lack it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._io import RunMismatchError, dumps_strict, write_atomic
from .._version import __version__
from ..patching import is_patched, patched, reset_state
from ..prompting import DEFAULT_STOP_STRINGS, PROMPT_STYLES, PromptFormat, generate_texts, style_system
from ..refinement.config import MAX_SAMPLES, RefineConfig, RefineConfigError, check_seed
from ..verify import EXTRACT_MODES, answers_match, extract_answer
from .ablation import VOTE_METHODS, MethodSpec
from .baseline import IMPORTED, check_source, imported_rows
from .data import Item, LoadResult, gold_value, load_items, read_gold
from .distributed import Shard
from .nll import solution_nll
from .rundir import RUN_FORMAT, RunDir

__all__ = [
    "DEFAULT_STOP_STRINGS", "RunSettings", "SettingError", "check_items", "check_run", "data_info", "oracle_tag",
    "run_evaluation",
]

# Below this a sampling temperature divides logits into float overflow (1e-300 made every probability NaN
# after the base rows were written); greedy decoding is temperature 0.
MIN_TEMPERATURE = 1e-4
# Solved examples in a fewshot prompt: far more than any published GSM8K setting (5 or 8), and few enough that
# the prompt's size is a setting, not an accident (100,000 asked for every train item, then overflowed).
MAX_SHOTS = 64


def oracle_tag(oracle: bool) -> str:
    """The label every output of an oracle method carries."""
    return " [ORACLE]" if oracle else ""


# -- settings ------------------------------------------------------------------------------------
def data_info(result: LoadResult, source: str, question_field: str = "question", answer_field: str = "answer",
              limit: int | None = None, offset: int = 0, sample: int | None = None, seed: int = 0) -> dict[str, Any]:
    """What run.json records about the items: how they were chosen and a hash of their content."""
    digest = hashlib.sha256()
    for item in result.items:
        digest.update(json.dumps([item.id, item.question, item.answer]).encode())
    return {
        "source": str(source), "path": str(result.path) if result.path else None,
        "question_field": question_field, "answer_field": answer_field, "limit": limit, "offset": offset,
        "sample": sample, "seed": seed, "n_items": len(result.items), "items_sha256": digest.hexdigest(),
        "skipped": len(result.skipped),
    }


class SettingError(ValueError):
    """A `RunSettings` value that is invalid; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass
class RunSettings:
    """Everything that decides a run's numbers; stored in ``run.json`` and checked on resume.

    ``seed`` seeds generation and refinement (greedy decoding does not use it). ``generate`` False
    is an NLL-only run. ``prompt`` is the prompt style (`vps.prompting.PROMPT_STYLES`): "tutor" (the
    default), "boxed" (the Qwen family's own convention) or "fewshot" (lm-eval's plain-text format, with
    ``shots`` solved examples from GSM8K train). ``system`` None means the style's own system prompt.
    ``refine_iters`` (>= 1) and ``refine_k_samples`` (>= 0) are the refine methods' iterations and
    self-consistency samples; a run with a refine method needs ``refine_k_samples >= 1`` (`check_run`):
    with none, self-consistency would be skipped without a word. Every float must be finite and every
    stop string non-empty. An invalid value raises `SettingError` naming its field.
    """

    model: str
    data: dict[str, Any]
    dtype: str = "float32"
    generate: bool = True
    nll: bool = False
    max_new_tokens: int = 256
    temperature: float = 0.0
    stop_strings: Sequence[str] = DEFAULT_STOP_STRINGS
    system: str | None = None
    prompt: str = "tutor"
    shots: int = 5
    extract_mode: str = "flexible"
    refine_iters: int = 3
    refine_k_samples: int = 4
    seed: int = 0
    command: str = "eval"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # a NaN would be stored, and then never equal itself on resume
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise SettingError(f.name, f"{f.name} must be a finite number, got {value}")
        if not self.generate and not self.nll:
            raise SettingError("generate", "nothing to measure: enable generation, the NLL metric, or both")
        if self.max_new_tokens < 1:
            raise SettingError("max_new_tokens", f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature != 0 and not MIN_TEMPERATURE <= self.temperature:
            raise SettingError("temperature", f"temperature must be 0 (greedy) or >= {MIN_TEMPERATURE} (below it "
                                              f"sampling overflows), got {self.temperature}")
        if self.refine_iters < 1:
            raise SettingError("refine_iters", f"refine_iters must be >= 1, got {self.refine_iters}")
        if not 0 <= self.refine_k_samples <= MAX_SAMPLES:
            raise SettingError("refine_k_samples", f"refine_k_samples must be in [0, {MAX_SAMPLES}], got "
                                                   f"{self.refine_k_samples}")
        try:
            check_seed(self.seed)
        except RefineConfigError as exc:
            raise SettingError("seed", str(exc)) from None
        if self.prompt not in PROMPT_STYLES:
            raise SettingError("prompt", f"prompt must be one of {PROMPT_STYLES}, got {self.prompt!r}")
        if self.prompt == "fewshot" and self.system is not None:
            raise SettingError("system", "the fewshot prompt uses no chat template, so it takes no system prompt")
        if not 1 <= self.shots <= MAX_SHOTS:
            raise SettingError("shots", f"shots must be in [1, {MAX_SHOTS}], got {self.shots}")
        if self.extract_mode not in EXTRACT_MODES:
            raise SettingError("extract_mode",
                               f"extract_mode must be one of {EXTRACT_MODES}, got {self.extract_mode!r}")
        if isinstance(self.stop_strings, str):
            raise SettingError("stop_strings", f"stop_strings must be a list of strings, got {self.stop_strings!r}")
        self.stop_strings = list(self.stop_strings)
        for stop in self.stop_strings:
            if not isinstance(stop, str) or not stop:
                raise SettingError("stop_strings", f"stop strings must be non-empty text, got {stop!r} (an empty "
                                                   f"one would stop every output before its first token)")

    def prompt_format(self) -> PromptFormat:
        """The run's `PromptFormat`; fewshot reads its examples from the start of GSM8K train."""
        if self.prompt != "fewshot":
            return PromptFormat(self.prompt, self.system)
        pool = load_items("gsm8k:train", limit=self.shots + 1).items
        return PromptFormat("fewshot", shots=tuple((it.question, it.answer) for it in pool), n_shots=self.shots)

    def refine_config(self, **changes: Any) -> RefineConfig:
        """The refine methods' `RefineConfig` (and the vote methods' sample settings), with ``changes``.

        The samples' temperature is refinement's own (`SAMPLE_TEMPERATURE`): ``temperature`` is the
        base and vps methods' decoding, which the run.json field keeps its name for.
        """
        return RefineConfig(iters=self.refine_iters, k_samples=self.refine_k_samples,
                            max_new_tokens=self.max_new_tokens, seed=self.seed).replace(**changes)

    def to_dict(self, specs: Sequence[MethodSpec] = ()) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["system"] = style_system(self.prompt, self.system)
        if self.prompt != "fewshot":
            del out["shots"]
        base = next((s.name for s in specs if s.method == "base"), None)
        return {"format": RUN_FORMAT, "vps_version": __version__, **out, "baseline": base,
                "configs": {s.name: s.to_dict() for s in specs}}


# -- running -------------------------------------------------------------------------------------
def _gold(item: Item) -> tuple[Any, str | None, Any]:
    """(gold value for the row, gold text, the parsed gold Answer or None)."""
    answer = read_gold(item.answer)
    return gold_value(answer), None if answer is None else answer.text, answer


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else x


def _base_row(item: Item, spec: MethodSpec, prompt: str, batch_size: int) -> dict[str, Any]:
    gold, gold_text, _ = _gold(item)
    return {
        "id": item.id, "index": item.index, "config": spec.name, "method": spec.method, "oracle": spec.oracle,
        "prompt": prompt, "output": None, "pred": None, "pred_number": None, "pred_source": None,
        "gold": gold, "gold_text": gold_text, "correct": None, "tokens": None, "seconds": None,
        "nll": None, "nll_tokens": None, "nll_seconds": None, "batch_size": batch_size,
    }


def _score(row: dict[str, Any], item: Item, output: str, answer: Any) -> None:
    row["output"] = output
    if answer is not None:
        row.update(pred=answer.text, pred_number=answer.number, pred_source=answer.source)
    row["correct"] = bool(answers_match(answer, _gold(item)[2]))


@contextlib.contextmanager
def _activated(model: Any, spec: MethodSpec) -> Iterator[None]:
    """The model as ``spec`` needs it: unpatched for base, patched with its config otherwise."""
    if not spec.patched:
        yield
        return
    with patched(model, spec.config):
        yield


def _sample_cache(rows: Sequence[dict[str, Any]]) -> Any:
    """A cache holding the samples recorded in the run's finished refine and vote rows: a resumed run
    reuses what an earlier process drew (refine-oracle or vps-maj after refine-self) as an uninterrupted
    one does."""
    from ..refinement.samples import SampleCache

    cache = SampleCache()
    for row in rows:
        holder = row.get("refine") if isinstance(row.get("refine"), dict) else row.get("vote")
        record = holder.get("sample_record") if isinstance(holder, dict) else None
        if record is not None and isinstance(row.get("prompt"), str):
            try:
                cache.restore(row["prompt"], record)
            except ValueError as exc:
                raise RunMismatchError(f"item {row.get('id')!r} ({row.get('config')}): {exc}") from None
    return cache


def _default_refine() -> Callable[..., Any]:
    try:
        from ..refinement.loop import refine_many
    except ImportError as exc:
        raise RuntimeError(f"refine methods need vps.refinement, which cannot be imported: {exc}") from None
    return refine_many


def run_evaluation(
    model: Any,
    tokenizer: Any,
    items: Sequence[Item],
    specs: Sequence[MethodSpec],
    out_dir: str | Path,
    settings: RunSettings,
    *,
    batch_size: int = 8,
    progress: bool = True,
    generate_fn: Callable[..., tuple[list[str], list[int]]] | None = None,
    refine_fn: Callable[..., Any] | None = None,
    on_batch: Callable[[str, list[dict[str, Any]]], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
    log: Callable[[str], None] | None = None,
    shard: Shard | None = None,
    baseline_from: str | Path | None = None,
) -> dict[str, int]:
    """Run every spec over ``items``, appending rows to ``out_dir``; returns rows written per config.

    The model is loaded once by the caller and must be unpatched; each non-base spec patches it for
    its own run and unpatches it afterwards. Rows already in ``out_dir`` are skipped. Patched state
    (policy history, stored plans) is reset before every batch, so a row does not depend on which
    batches ran before it. ``generate_fn`` (default `vps.prompting.generate_texts`) and
    ``refine_fn`` (default `vps.refinement.refine_many`, called with a list of prompts, the golds in oracle
    mode, ``config=`` `RunSettings.refine_config` and ``sample_cache=``) can be replaced,
    e.g. in tests; ``on_batch`` is called after each batch is on disk. Everything is checked
    (`check_run`) before anything is written; the directory is locked for the whole call
    (`RunLockedError` if another process holds it).

    With ``shard`` (rank R of N, from `vps.evaluation.distributed.rank_session`) the call is one rank of a
    data-parallel run: it runs the items at positions R, R + N, ... of the run's item order, appends to
    ``rows.rank{R}.jsonl`` under its own lock, and skips the rows ``results.jsonl`` holds; rank 0 alone
    writes run.json, merges what earlier launches left before the ranks start, and merges every rank's
    rows into ``results.jsonl`` (in a single process's order) after they all finished
    (``shard.sync("start")`` and ``shard.sync("finish")``). It returns the rows this rank wrote; only
    rank 0 shows a progress bar, and log lines say the rank.

    ``baseline_from`` (a run directory) supplies the ``base`` rows it holds for these items instead of
    computing them (`vps.evaluation.baseline`: refused unless its base rows would come out the same here;
    copied rows say where they came from, and so do run.json and the report).
    """
    if shard is not None and shard.size == 1:
        shard = None
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if is_patched(model):
        raise ValueError("pass an unpatched model; the harness patches it per configuration")
    check_run(items, specs, settings)
    rendered = preflight(model, tokenizer, items, specs, settings)
    source = None
    if baseline_from is not None:
        source = check_source(baseline_from, settings.to_dict(specs))
    if log is None:
        prefix = "" if shard is None else f"rank {shard.rank} of {shard.size}: "
        log = lambda msg: print(prefix + msg, file=sys.stderr, flush=True)
    generate_fn = generate_fn if generate_fn is not None else generate_texts

    run = RunDir(out_dir)
    run.check_target()
    with contextlib.ExitStack() as locks:
        if shard is not None:
            locks.enter_context(run.lock(rank=shard.rank))
        if shard is None or shard.primary:
            locks.enter_context(run.lock())
        return _run_locked(model, tokenizer, items, specs, run, settings, batch_size, progress, generate_fn,
                           refine_fn, on_batch, clock, log, rendered, shard, source)


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
            missing = [it.id for it in items if _gold(it)[0] is None]
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


def _prepare(tokenizer: Any, items: Sequence[Item], specs: Sequence[MethodSpec], run: RunDir,
             settings: RunSettings, log: Callable[[str], None], write: bool,
             rendered: tuple[PromptFormat, dict[str, str]]) -> tuple[PromptFormat, dict[str, str], list[Item]]:
    """run.json created or checked (written when ``write``); returns the prompt format and every item's prompt
    (``rendered``, as `preflight` built them) and the items in the run's order: by token length, longest first
    (`_by_length`), which wastes far less compute on padding than the input order (~1.4x on GSM8K at batch 8);
    rows do not depend on their batch."""
    _, added = run.prepare(settings.to_dict(specs), write=write)
    if added and run.results.exists() and write:
        log(f"adding configuration(s) {', '.join(added)} to {run.path}")
    fmt, prompts = rendered
    return fmt, prompts, _by_length(tokenizer, items, prompts, with_answer=settings.nll, prefix=fmt.solution_prefix)


def _single_process_order(specs: Sequence[MethodSpec], items: Sequence[Item]) -> Callable[[dict[str, Any]], Any]:
    """The sort key of rows in the order one process appends them: configuration by configuration (those
    of earlier invocations last, by name), each in the run's item order."""
    spec_at = {s.name: i for i, s in enumerate(specs)}
    item_at = {it.id: i for i, it in enumerate(items)}

    def key(row: dict[str, Any]) -> tuple[int, str, int, str]:
        config, item = str(row.get("config")), str(row.get("id"))
        return (spec_at.get(config, len(spec_at)), "" if config in spec_at else config,
                item_at.get(item, len(item_at)), item)

    return key


def _run_locked(model: Any, tokenizer: Any, items: Sequence[Item], specs: Sequence[MethodSpec], run: RunDir,
                settings: RunSettings, batch_size: int, progress: bool, generate_fn: Callable[..., Any],
                refine_fn: Callable[..., Any] | None, on_batch: Callable[[str, list[dict[str, Any]]], None] | None,
                clock: Callable[[], float], log: Callable[[str], None],
                rendered: tuple[PromptFormat, dict[str, str]], shard: Shard | None = None,
                source: tuple[RunDir, str] | None = None) -> dict[str, int]:
    primary = shard is None or shard.primary
    if primary:
        fmt, prompts, items = _prepare(tokenizer, items, specs, run, settings, log, True, rendered)
        # Without rank files (every single-process run but one after a launch) this is read_rows(repair=True).
        finished = run.merge_rank_files(_single_process_order(specs, items))
        if source is not None:  # before the other ranks read the finished rows
            finished += _import_baseline(run, source, specs, items, prompts, finished, log)
    if shard is not None:
        # Nobody appends before every rank is here, so every rank reads the same finished rows; the
        # others check run.json only now, when rank 0 has surely written it.
        shard.sync("start")
        if not primary:
            fmt, prompts, items = _prepare(tokenizer, items, specs, run, settings, log, False, rendered)
            finished = run.read_rows()
    done = {(str(r.get("id")), str(r.get("config"))) for r in finished}
    mine = items if shard is None else shard.take(items)
    rows_file = run if shard is None else run.for_rank(shard.rank)
    share = "" if shard is None else " of this rank's share"
    samples = any(s.samples for s in specs)
    written: dict[str, int] = {}
    sample_cache = _sample_cache(finished) if samples else None
    if sample_cache is not None and len(sample_cache):
        log(f"refine: samples of {len(sample_cache)} item(s) restored from earlier rows, to be reused where they apply")

    for spec in specs:
        pending = [it for it in mine if (it.id, spec.name) not in done]
        tag = oracle_tag(spec.oracle)
        if spec.oracle:
            log(f"{spec.name}: ORACLE method - it reads the gold answer at test time; its rows say oracle=true")
        if not pending:
            log(f"{spec.name}{tag}: all {len(mine)} items{share} already in {run.results}")
            written[spec.name] = 0
            continue
        if len(pending) < len(mine):
            log(f"{spec.name}{tag}: resuming, {len(mine) - len(pending)} of {len(mine)} items{share} already done")
        # One bar per terminal: rank 0's stands for the launch (the ranks' shares are the same size).
        desc = spec.name + tag + ("" if shard is None else f" [rank 0 of {shard.size}]")
        bar = _progress(progress and primary, desc, len(mine), len(mine) - len(pending))
        written[spec.name] = 0
        try:
            with _activated(model, spec):
                refine = _default_refine() if spec.refines and refine_fn is None else refine_fn
                for start in range(0, len(pending), batch_size):
                    batch = pending[start:start + batch_size]
                    if spec.refines:
                        assert refine is not None  # _default_refine() when no refine_fn was given
                        rows = _refine_batch(model, tokenizer, batch, spec, prompts, settings, refine, clock,
                                             sample_cache)
                    elif spec.method in VOTE_METHODS:
                        rows = _vote_batch(model, tokenizer, batch, spec, prompts, settings, sample_cache)
                    else:
                        rows = _batch(model, tokenizer, batch, spec, prompts, settings, generate_fn, clock,
                                      fmt.solution_prefix)
                    rows_file.append(rows)
                    written[spec.name] += len(rows)
                    if bar is not None:
                        bar.update(len(rows))
                    if on_batch is not None:
                        on_batch(spec.name, rows)
        finally:
            if bar is not None:
                bar.close()
    if shard is not None:
        shard.sync("finish")
        if primary:
            run.merge_rank_files(_single_process_order(specs, items))
    return written


def _import_baseline(run: RunDir, source: tuple[RunDir, str], specs: Sequence[MethodSpec], items: Sequence[Item],
                     prompts: dict[str, str], finished: Sequence[dict[str, Any]],
                     log: Callable[[str], None]) -> list[dict[str, Any]]:
    """The base rows copied from ``source`` into ``run`` (appended, and counted in run.json)."""
    name = next(s.name for s in specs if s.method == "base")
    done = {str(r.get("id")) for r in finished if r.get("config") == name}
    golds = {it.id: _gold(it)[1] for it in items}
    rows = imported_rows(source[0], source[1], name, items, prompts, golds, done)
    if rows:
        run.append(rows)
        stored = run.read_settings() or {}
        imports = stored.setdefault(IMPORTED, {})
        before = imports.get(name, {}).get("rows", 0)
        imports[name] = {"from": str(source[0].path), "rows": before + len(rows)}
        write_atomic(run.run_file, dumps_strict(stored, indent=2) + "\n")
    missing = len(items) - len(done) - len(rows)
    log(f"{name}: {len(rows)} row(s) imported from {source[0].path}"
        + (f"; the {missing} item(s) it lacks are computed here" if missing else ""))
    return rows


def _by_length(tokenizer: Any, items: Sequence[Item], prompts: dict[str, str], with_answer: bool,
               prefix: str = "") -> list[Item]:
    """Items by descending token length (prompt, plus the gold solution when it is scored); stable."""
    def length(it: Item) -> int:
        text = prompts[it.id] + (prefix + it.answer if with_answer else "")
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    lengths = {it.id: length(it) for it in items}
    return sorted(items, key=lambda it: -lengths[it.id])


def _progress(enabled: bool, desc: str, total: int, initial: int) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="item", dynamic_ncols=True, file=sys.stderr)


def _batch(model: Any, tokenizer: Any, batch: Sequence[Item], spec: MethodSpec, prompts: dict[str, str],
           settings: RunSettings, generate_fn: Callable[..., Any], clock: Callable[[], float],
           solution_prefix: str = "") -> list[dict[str, Any]]:
    """One batch of base or vps: batched generation, then the gold-solution NLL."""
    texts = [prompts[it.id] for it in batch]
    rows = [_base_row(it, spec, prompts[it.id], len(batch)) for it in batch]
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
            _score(row, it, out, extract_answer(out, settings.extract_mode))
            row.update(tokens=int(n), seconds=share)
    if settings.nll:
        if spec.patched:
            reset_state(model)
        start = clock()
        with _counting_fallbacks(model, spec, len(batch), fallbacks):
            scores = solution_nll(model, tokenizer, texts, [solution_prefix + it.answer for it in batch])
        share = (clock() - start) / len(batch)
        for row, s in zip(rows, scores, strict=True):
            row.update(nll=_finite(s.nll), nll_tokens=s.tokens, nll_seconds=share)
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
    from ..tracing import count_fallbacks

    with count_fallbacks(model, batch) as count:
        yield
    for i, n in enumerate(count.per_sequence):
        into[i] += n


def _refine_batch(model: Any, tokenizer: Any, batch: Sequence[Item], spec: MethodSpec, prompts: dict[str, str],
                  settings: RunSettings, refine_fn: Callable[..., Any],
                  clock: Callable[[], float], sample_cache: Any) -> list[dict[str, Any]]:
    """Refine the batch's items together; the oracle mode alone receives the gold answers.

    Methods that draw the same self-consistency samples (refine-self and refine-oracle of one
    configuration) share them through ``sample_cache``; a row that reuses samples adds what drawing
    them cost to its seconds, so its cost stays that of the whole method.
    """
    golds = [_gold(it)[0] for it in batch]
    if spec.oracle:
        for it, gold in zip(batch, golds, strict=True):
            if gold is None:
                raise ValueError(f"item {it.id}: refine-oracle needs a gold answer and this item has none")
    reset_state(model)
    start = clock()
    config = settings.refine_config(mode="oracle" if spec.oracle else "self")
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
        row = _base_row(it, spec, prompts[it.id], len(batch))
        # The final text is read as every method's output is, in the run's extraction mode; the
        # loop's own reading (flexible) only chose which iteration's text that is.
        _score(row, it, result.best_text, extract_answer(result.best_text, settings.extract_mode))
        row.update(tokens=int(result.tokens), seconds=share + float(getattr(result, "reused_seconds", 0.0)),
                   refine=result.to_dict())
        row["oracle"] = spec.oracle
        rows.append(row)
    return rows


# The stated, deterministic tie rule of the majority-vote methods.
VOTE_TIE_RULE = "most votes (answers equal within the verifier's tolerance); a tie goes to the answer sampled first"


def _vote_batch(model: Any, tokenizer: Any, batch: Sequence[Item], spec: MethodSpec, prompts: dict[str, str],
                settings: RunSettings, sample_cache: Any) -> list[dict[str, Any]]:
    """``maj@k`` / ``vps-maj@k``: a majority vote over k sampled completions per item.

    The samples are refinement's self-consistency samples (same temperature, seed, streams and cache),
    so next to ``refine-self`` with k samples, ``vps-maj@k`` votes over exactly the samples refinement
    drew and costs nothing more; a row's seconds are what drawing its samples cost, reused or not.
    The row's output is the first sample carrying the winning answer, read in the run's extraction mode.
    """
    from ..refinement.loop import draw_samples
    from ..verify import CompositeVerifier
    from ..verify.consistency import majority_answer

    assert spec.votes is not None  # a vote method's spec always has votes (MethodSpec checks it)
    config = settings.refine_config(k_samples=spec.votes)
    fingerprint, drawn = draw_samples(model, tokenizer, [prompts[it.id] for it in batch], config, sample_cache)
    rel_tol = CompositeVerifier().rel_tol
    rows = []
    for it, d in zip(batch, drawn, strict=True):
        winner, count = majority_answer(d.answers, rel_tol)
        row = _base_row(it, spec, prompts[it.id], len(batch))
        if winner is None:
            _score(row, it, d.texts[0] if d.texts else "", None)
        elif d.texts is not None:
            chosen = d.texts[d.answers.index(winner)]
            _score(row, it, chosen, extract_answer(chosen, settings.extract_mode))
        else:  # samples restored from a record written before texts were kept
            _score(row, it, winner.text, winner)
        row.update(tokens=int(d.tokens), seconds=float(d.seconds), vote={
            "k": spec.votes, "winner_votes": count, "answers": [None if a is None else a.text for a in d.answers],
            "tie_rule": VOTE_TIE_RULE, "samples_reused": d.reused, "sample_record": d.to_record(fingerprint)})
        rows.append(row)
    return rows
