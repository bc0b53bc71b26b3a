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

Row schema: every row holds `vps.evaluation.methods.rows.COMMON_FIELDS` (None where not applicable),
then the fields its method adds (`Method.row_fields`; e.g. ``refine``, ``vote``, ``fallbacks``). The methods
are looked up in the registry (`vps.evaluation.methods`): this loop knows none of them by name. It runs
them configuration by configuration, each with the model as it needs it (patched or not), in batches of the
run's item order, and appends each batch's rows as they come.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._io import RunMismatchError, dumps_strict, write_atomic
from ..patching import is_patched, patched
from ..prompting import PromptFormat, generate_texts
from ..refinement.progress import phase_reports
from .baseline import IMPORTED, check_source, imported_rows
from .checks import check_run, preflight
from .data import Item
from .distributed import Shard
from .methods.registry import MethodSpec, RunContext, registered
from .methods.rows import gold
from .rundir import RunDir, run_record
from .settings import RunSettings

__all__ = ["oracle_tag", "run_evaluation"]


def oracle_tag(oracle: bool) -> str:
    """The label every output of an oracle method carries."""
    return " [ORACLE]" if oracle else ""


@contextlib.contextmanager
def _activated(model: Any, spec: MethodSpec) -> Iterator[None]:
    """The model as ``spec`` needs it: unpatched for an unpatched method, patched with its config otherwise."""
    if not spec.patched:
        yield
        return
    with patched(model, spec.config):
        yield


def _sample_cache(rows: Sequence[dict[str, Any]]) -> Any:
    """A cache holding the samples recorded in the run's finished rows of the methods that draw samples (each
    under its `Method.sample_field`): a resumed run reuses what an earlier process drew (refine-oracle or
    vps-maj after refine-self) as an uninterrupted one does."""
    from ..refinement.samples import SampleCache

    fields = list(dict.fromkeys(m.sample_field for m in registered() if m.sample_field is not None))
    cache = SampleCache()
    for row in rows:
        holder = next((row[f] for f in fields if isinstance(row.get(f), dict)), None)
        record = holder.get("sample_record") if holder is not None else None
        if record is not None and isinstance(row.get("prompt"), str):
            try:
                cache.restore(row["prompt"], record)
            except ValueError as exc:
                raise RunMismatchError(f"item {row.get('id')!r} ({row.get('config')}): {exc}") from None
    return cache


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
    checkpoint_activations: bool = False,
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

    ``checkpoint_activations`` makes the refine methods' steps recompute the decoder blocks' activations in
    the backward instead of keeping them (`RefineConfig.checkpoint_activations`): less memory, the same rows,
    so, like ``batch_size``, it is no setting of the run.
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
        source = check_source(baseline_from, run_record(settings, specs))
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
        return _run_locked(_Job(model, tokenizer, items, specs, run, settings, batch_size, progress, generate_fn,
                                refine_fn, on_batch, clock, log, rendered, shard, source, checkpoint_activations))


@dataclass
class _Job:
    """One `run_evaluation` call, checked: what the locked part of the run works from."""

    model: Any
    tokenizer: Any
    items: Sequence[Item]
    specs: Sequence[MethodSpec]
    run: RunDir
    settings: RunSettings
    batch_size: int
    progress: bool
    generate_fn: Callable[..., Any]
    refine_fn: Callable[..., Any] | None
    on_batch: Callable[[str, list[dict[str, Any]]], None] | None
    clock: Callable[[], float]
    log: Callable[[str], None]
    rendered: tuple[PromptFormat, dict[str, str]]
    shard: Shard | None = None
    source: tuple[RunDir, str] | None = None
    checkpoint_activations: bool = False


def _prepare(tokenizer: Any, items: Sequence[Item], specs: Sequence[MethodSpec], run: RunDir,
             settings: RunSettings, log: Callable[[str], None], write: bool,
             rendered: tuple[PromptFormat, dict[str, str]]) -> tuple[PromptFormat, dict[str, str], list[Item]]:
    """run.json created or checked (written when ``write``); returns the prompt format and every item's prompt
    (``rendered``, as `preflight` built them) and the items in the run's order: by token length, longest first
    (`_by_length`), which wastes far less compute on padding than the input order (~1.4x on GSM8K at batch 8);
    rows do not depend on their batch."""
    _, added = run.prepare(run_record(settings, specs), write=write)
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



def _run_locked(job: _Job) -> dict[str, int]:
    run, shard, specs, log = job.run, job.shard, job.specs, job.log
    primary = shard is None or shard.primary
    if primary:
        fmt, prompts, items = _prepare(job.tokenizer, job.items, specs, run, job.settings, log, True, job.rendered)
        # Without rank files (every single-process run but one after a launch) this is read_rows(repair=True).
        finished = run.merge_rank_files(_single_process_order(specs, items))
        if job.source is not None:  # before the other ranks read the finished rows
            finished += _import_baseline(run, job.source, specs, items, prompts, finished, log)
    if shard is not None:
        # Nobody appends before every rank is here, so every rank reads the same finished rows; the
        # others check run.json only now, when rank 0 has surely written it.
        shard.sync("start")
        if not primary:
            fmt, prompts, items = _prepare(job.tokenizer, job.items, specs, run, job.settings, log, False,
                                           job.rendered)
            finished = run.read_rows()
    done = {(str(r.get("id")), str(r.get("config"))) for r in finished}
    mine = items if shard is None else shard.take(items)
    rows_file = run if shard is None else run.for_rank(shard.rank)
    share = "" if shard is None else " of this rank's share"
    samples = any(s.samples for s in specs)
    written: dict[str, int] = {}
    sample_cache = _sample_cache(finished) if samples else None
    if sample_cache is not None and len(sample_cache):
        log(f"refine: {len(sample_cache)} sample set(s) of {sample_cache.prompts} item(s) restored from earlier rows,"
            " to be reused where they apply")
    context = RunContext(job.model, job.tokenizer, job.settings, prompts, fmt.solution_prefix, job.generate_fn,
                         job.refine_fn, job.clock, sample_cache, job.checkpoint_activations)

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
        bar = _progress(job.progress and primary, desc, len(mine), len(mine) - len(pending))
        written[spec.name] = 0
        try:
            # Refinement and sample draws say which phase a long batch is in, beside the bar.
            with _activated(job.model, spec), phase_reports(None if bar is None else bar.set_postfix_str):
                run_batch = spec.family.start(context, spec)  # the registered method's runner
                for start in range(0, len(pending), job.batch_size):
                    rows = run_batch(pending[start:start + job.batch_size])
                    rows_file.append(rows)
                    written[spec.name] += len(rows)
                    if bar is not None:
                        bar.update(len(rows))
                    if job.on_batch is not None:
                        job.on_batch(spec.name, rows)
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
    golds = {it.id: gold(it)[1] for it in items}
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

