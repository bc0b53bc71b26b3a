"""Run methods over evaluation items, one JSONL row per item and method, resumable.

An output directory holds ``run.json`` (the run's settings) and ``results.jsonl`` (append-only,
one row per (item id, config name), written, flushed and fsynced as each batch completes). A rerun
with the same directory skips the rows already there, so an interruption loses at most the batch
in flight; a final line cut off mid-write is dropped with a warning. A rerun whose settings differ
(model, data, sample, decoding, a config's overrides) is refused rather than mixing results; new
configurations may be added to a directory.

Row schema (keys always present; None where not applicable):
``id``, ``index`` (line in the source file), ``config`` (the row's label, unique in the run),
``method`` (base | vps | refine-self | refine-oracle), ``oracle`` (True when the gold answer was
used at test time), ``prompt``, ``output`` (for refine methods, the text the loop chose),
``pred`` / ``pred_number`` / ``pred_source`` (the answer read from ``output`` in the run's
extraction mode, for every method alike), ``gold`` (number, or text for a non-numeric gold) and ``gold_text``,
``correct``, ``tokens`` (generated), ``seconds`` (this item's share of its batch's wall time for
generation, or for the NLL pass in NLL-only runs), ``nll`` (mean NLL per gold-solution token),
``nll_tokens``, ``nll_seconds``, ``batch_size``; refine rows add ``refine`` (the loop's trace).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._version import __version__
from ..patching import is_patched, patch, reset_state, unpatch
from ..prompting import PROMPT_STYLES, PromptFormat, generate_texts, style_system
from ..verify import EXTRACT_MODES, answers_match, extract_answer, parse_gold
from .ablation import VOTE_METHODS, MethodSpec
from .data import Item, LoadResult, load_items
from .nll import SCORINGS, solution_nll

__all__ = [
    "DEFAULT_STOP_STRINGS", "RESULTS_FILE", "RUN_FILE", "RunDir", "RunMismatchError", "RunSettings", "data_info",
    "oracle_tag", "run_evaluation",
]

RESULTS_FILE = "results.jsonl"
RUN_FILE = "run.json"
RUN_FORMAT = 1
# The model's next turn, if it starts writing one: stop there and trim it.
DEFAULT_STOP_STRINGS = ("\nQuestion:", "\n\nQ:")
# Keys of run.json that describe the run but may differ between a run and its resumption.
# Settings of how a run computes, not of what it measures: the value stored by a run's first invocation
# is kept for the whole run, so every row of a run is computed the same way and its cost ratios stay
# comparable. The value is what runs written before the setting existed did. All but refine_sampling
# change no number beyond float rounding; refine_sampling changes which random draws the
# self-consistency samples get (not their distribution), so a run keeps it to stay reproducible.
_KEPT_FROM_FIRST_RUN = {"batch_order": "input", "nll_scoring": "recompute", "refine_batching": "item",
                        "refine_sampling": "global"}
# Compared settings that runs written before they existed lack; the value is what those runs did.
_COMPARED_DEFAULTS = {"prompt": "tutor"}
_NOT_COMPARED = {"format", "vps_version", "command", "baseline", "configs", "data.source", "data.path",
                 "data.skipped", *_KEPT_FROM_FIRST_RUN}
BATCH_ORDERS = ("length", "input")
REFINE_BATCHINGS = ("batch", "item")
REFINE_SAMPLINGS = ("streams", "global")


class RunMismatchError(ValueError):
    """The output directory holds a run with different settings."""


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


@dataclass
class RunSettings:
    """Everything that decides a run's numbers; stored in ``run.json`` and checked on resume.

    ``seed`` seeds generation and refinement (greedy decoding does not use it). ``generate`` False
    is an NLL-only run. ``prompt`` is the prompt style (`vps.prompting.PROMPT_STYLES`): "tutor" (the
    default), "boxed" (the Qwen family's own convention) or "fewshot" (lm-eval's plain-text format, with
    ``shots`` solved examples from GSM8K train). ``system`` None means the style's own system prompt.
    ``batch_order="length"``
    batches items of similar token length together (longest first), which wastes far less compute on
    padding than the input order (~1.4x on GSM8K at batch 8); rows do not depend on their batch.
    ``nll_scoring`` is `solution_nll`'s ``scoring`` ("cached" computes each prompt once).
    ``refine_batching="batch"`` refines a batch of items together (`vps.refine.refine_many`: each item
    keeps its own loop and state; decodes and surrogate steps are batched); "item" refines one at a time.
    ``refine_sampling`` is `vps.refine.refine_many`'s ``sampling``: "streams" draws every item's
    self-consistency samples in one batch from per-item random streams, "global" one item at a time.
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
    batch_order: str = "length"
    nll_scoring: str = "cached"
    refine_batching: str = "batch"
    refine_sampling: str = "streams"

    def __post_init__(self) -> None:
        if self.refine_sampling not in REFINE_SAMPLINGS:
            raise ValueError(f"refine_sampling must be one of {REFINE_SAMPLINGS}, got {self.refine_sampling!r}")
        if self.refine_batching not in REFINE_BATCHINGS:
            raise ValueError(f"refine_batching must be one of {REFINE_BATCHINGS}, got {self.refine_batching!r}")
        if self.nll_scoring not in SCORINGS:
            raise ValueError(f"nll_scoring must be one of {SCORINGS}, got {self.nll_scoring!r}")
        if self.batch_order not in BATCH_ORDERS:
            raise ValueError(f"batch_order must be one of {BATCH_ORDERS}, got {self.batch_order!r}")
        if not self.generate and not self.nll:
            raise ValueError("nothing to measure: enable generation, the NLL metric, or both")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.prompt not in PROMPT_STYLES:
            raise ValueError(f"prompt must be one of {PROMPT_STYLES}, got {self.prompt!r}")
        if self.prompt == "fewshot" and self.system is not None:
            raise ValueError("the fewshot prompt uses no chat template, so it takes no system prompt")
        if self.shots < 1:
            raise ValueError(f"shots must be >= 1, got {self.shots}")
        if self.extract_mode not in EXTRACT_MODES:
            raise ValueError(f"extract_mode must be one of {EXTRACT_MODES}, got {self.extract_mode!r}")
        self.stop_strings = list(self.stop_strings)

    def prompt_format(self) -> PromptFormat:
        """The run's `PromptFormat`; fewshot reads its examples from the start of GSM8K train."""
        if self.prompt != "fewshot":
            return PromptFormat(self.prompt, self.system)
        pool = load_items("gsm8k:train", limit=self.shots + 1).items
        return PromptFormat("fewshot", shots=tuple((it.question, it.answer) for it in pool), n_shots=self.shots)

    def to_dict(self, specs: Sequence[MethodSpec] = ()) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["system"] = style_system(self.prompt, self.system)
        if self.prompt != "fewshot":
            del out["shots"]
        base = next((s.name for s in specs if s.method == "base"), None)
        return {"format": RUN_FORMAT, "vps_version": __version__, **out, "baseline": base,
                "configs": {s.name: s.to_dict() for s in specs}}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _comparable_spec(spec: dict[str, Any]) -> dict[str, Any]:
    cfg = spec.get("config")
    cfg = None if cfg is None else {k: v for k, v in cfg.items() if k != "version"}
    return {"method": spec.get("method"), "config": cfg, "votes": spec.get("votes")}


def merge_settings(stored: dict[str, Any], new: dict[str, Any], where: str) -> dict[str, Any]:
    """``stored`` extended with ``new``'s configurations; raises `RunMismatchError` on any difference."""
    old_flat, new_flat = _flatten({**_COMPARED_DEFAULTS, **stored}), _flatten(new)
    keys = {k for k in old_flat.keys() | new_flat.keys()
            if not any(k == skip or k.startswith(skip + ".") for skip in _NOT_COMPARED)}
    # Generation settings only matter when generating.
    if not new.get("generate") and not stored.get("generate"):
        keys -= {"max_new_tokens", "temperature", "stop_strings", "extract_mode"}
    differ = sorted(k for k in keys if old_flat.get(k) != new_flat.get(k))
    problems = [f"{k}: stored {old_flat.get(k)!r}, now {new_flat.get(k)!r}" for k in differ]
    for name, spec in new.get("configs", {}).items():
        old = stored.get("configs", {}).get(name)
        if old is not None and _comparable_spec(old) != _comparable_spec(spec):
            changed = _flatten(_comparable_spec(spec))
            before = _flatten(_comparable_spec(old))
            fields = sorted(k for k in changed.keys() | before.keys() if changed.get(k) != before.get(k))
            problems.append(f"configuration {name!r} changed ({', '.join(fields)})")
    if stored.get("baseline") and new.get("baseline") and stored["baseline"] != new["baseline"]:
        problems.append(f"baseline: stored {stored['baseline']!r}, now {new['baseline']!r}")
    if problems:
        raise RunMismatchError(
            f"{where} holds a run with different settings; refusing to mix results. Differences: "
            + "; ".join(problems) + ". Use another --out directory, or rerun with the stored settings "
            f"(see {where}/{RUN_FILE}).")
    merged = dict(stored)
    merged["configs"] = {**stored.get("configs", {}), **new.get("configs", {})}
    merged["baseline"] = stored.get("baseline") or new.get("baseline")
    if stored.get("vps_version") != new.get("vps_version"):
        warnings.warn(f"{where} was written by vps {stored.get('vps_version')}, this is {new.get('vps_version')}",
                      stacklevel=3)
    return merged


# -- the output directory --------------------------------------------------------------------------
def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, so a reader sees the old or the new file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class RunDir:
    """``run.json`` and the append-only ``results.jsonl`` of one output directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.results = self.path / RESULTS_FILE
        self.run_file = self.path / RUN_FILE

    def read_settings(self) -> dict[str, Any] | None:
        if not self.run_file.exists():
            return None
        try:
            data = json.loads(self.run_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise RunMismatchError(f"{self.run_file} is not valid JSON ({exc}); move the directory aside") from None
        if not isinstance(data, dict):
            raise RunMismatchError(f"{self.run_file} must hold a JSON object")
        return data

    def prepare(self, settings: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """Create or check run.json; returns the stored settings and the names of newly added configs."""
        self.path.mkdir(parents=True, exist_ok=True)
        stored = self.read_settings()
        if stored is None:
            if self.results.exists() and self.results.stat().st_size > 0:
                raise RunMismatchError(f"{self.results} exists without {self.run_file}; refusing to mix results")
            merged, added = settings, []
        else:
            merged = merge_settings(stored, settings, str(self.path))
            added = [n for n in settings.get("configs", {}) if n not in stored.get("configs", {})]
        if merged != stored:
            write_atomic(self.run_file, json.dumps(merged, indent=2) + "\n")
        return merged, added

    def read_rows(self, repair: bool = False) -> list[dict[str, Any]]:
        """Every complete row, first occurrence of each (id, config) kept.

        A final line that does not parse (a write cut off by a kill) is ignored with a warning;
        ``repair`` also cuts it from the file so appends start on a fresh line. An unparsable line
        anywhere else is an error naming the line.
        """
        if not self.results.exists():
            return []
        raw = self.results.read_bytes()
        lines = raw.split(b"\n")
        ends_clean = raw.endswith(b"\n") or not raw
        if ends_clean:
            lines = lines[:-1]
        rows: list[dict[str, Any]] = []
        seen: set[tuple[str, str]] = set()
        offset = 0
        for number, line in enumerate(lines, start=1):
            last = number == len(lines)
            try:
                row = json.loads(line) if line.strip() else None
                if row is not None and not isinstance(row, dict):
                    raise ValueError("not a JSON object")
            except ValueError as exc:
                if not last:
                    raise RunMismatchError(f"{self.results}:{number}: unparsable line ({exc}); the file was "
                                           f"changed by something other than the harness") from None
                warnings.warn(f"{self.results}:{number}: ignoring an unparsable final line (a write cut off "
                              f"by an interruption); that item will be run again", stacklevel=2)
                if repair:
                    with self.results.open("r+b") as fh:
                        fh.truncate(offset)
                        fh.flush()
                        os.fsync(fh.fileno())
                break
            offset += len(line) + 1
            if row is None:
                continue
            if last and not ends_clean and repair:
                with self.results.open("ab") as fh:
                    fh.write(b"\n")
            key = (str(row.get("id")), str(row.get("config")))
            if key in seen:
                warnings.warn(f"{self.results}:{number}: duplicate row for id {key[0]!r} config {key[1]!r}; "
                              f"keeping the first", stacklevel=2)
                continue
            seen.add(key)
            rows.append(row)
        return rows

    def append(self, rows: Sequence[dict[str, Any]]) -> None:
        """Append rows as one write, flushed and fsynced, so a batch is either on disk or not."""
        if not rows:
            return
        payload = "".join(json.dumps(r, ensure_ascii=False, default=_jsonable) + "\n" for r in rows)
        with self.results.open("a", encoding="utf-8") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())


def _jsonable(value: Any) -> Any:
    """JSON fallback for refine traces: dataclasses, tensors, numpy scalars, sets."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    return repr(value)


# -- running -------------------------------------------------------------------------------------
def _gold(item: Item) -> tuple[Any, str | None, Any]:
    """(gold value for the row, gold text, the parsed gold Answer or None)."""
    try:
        answer = parse_gold(item.answer)
    except ValueError:
        return None, None, None
    value = answer.number if answer.number is not None else answer.text
    return value, answer.text, answer


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
    patch(model, spec.config)
    try:
        yield
    finally:
        unpatch(model)


def _sample_cache(rows: Sequence[dict[str, Any]]) -> Any:
    """A cache holding the samples recorded in the run's finished refine and vote rows: a resumed run
    reuses what an earlier process drew (refine-oracle or vps-maj after refine-self) as an uninterrupted
    one does."""
    from ..samples import SampleCache

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
        from ..refine import refine_many
    except ImportError as exc:
        raise RuntimeError(f"refine methods need vps.refine, which cannot be imported: {exc}") from None
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
) -> dict[str, int]:
    """Run every spec over ``items``, appending rows to ``out_dir``; returns rows written per config.

    The model is loaded once by the caller and must be unpatched; each non-base spec patches it for
    its own run and unpatches it afterwards. Rows already in ``out_dir`` are skipped. Patched state
    (policy history, stored plans) is reset before every batch, so a row does not depend on which
    batches ran before it. ``generate_fn`` (default `vps.prompting.generate_texts`) and
    ``refine_fn`` (default `vps.refine.refine_many`, called with a list of prompts) can be replaced,
    e.g. in tests; ``on_batch`` is called after each batch is on disk.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if is_patched(model):
        raise ValueError("pass an unpatched model; the harness patches it per configuration")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"configuration names must be unique, got {names}")
    if not settings.generate and any(s.samples for s in specs):
        raise ValueError("refine and majority-vote methods generate; they cannot run in an NLL-only run")
    log = log if log is not None else (lambda msg: print(msg, file=sys.stderr, flush=True))
    generate_fn = generate_fn if generate_fn is not None else generate_texts

    run = RunDir(out_dir)
    stored, added = run.prepare(settings.to_dict(specs))
    if added and run.results.exists():
        log(f"adding configuration(s) {', '.join(added)} to {run.path}")
    kept = {key: stored.get(key, legacy) for key, legacy in _KEPT_FROM_FIRST_RUN.items()}
    refines = any(s.refines for s in specs)
    samples = any(s.samples for s in specs)
    for key, value in kept.items():
        applies = (samples if key == "refine_sampling" else refines if key.startswith("refine")
                   else settings.nll if key == "nll_scoring" else True)
        if applies and value != getattr(settings, key):
            log(f"keeping this run's stored {key.replace('_', ' ')} {value!r} (asked for {getattr(settings, key)!r})")
    order, scoring = kept["batch_order"], kept["nll_scoring"]
    finished = run.read_rows(repair=True)
    done = {(str(r.get("id")), str(r.get("config"))) for r in finished}
    fmt = settings.prompt_format()
    prompts = {item.id: fmt.render(tokenizer, item.question) for item in items}
    if order == "length":
        items = _by_length(tokenizer, items, prompts, with_answer=settings.nll, prefix=fmt.solution_prefix)
    written: dict[str, int] = {}
    sample_cache = _sample_cache(finished) if samples else None
    if sample_cache is not None and len(sample_cache):
        log(f"refine: samples of {len(sample_cache)} item(s) restored from earlier rows, to be reused where they apply")

    for spec in specs:
        pending = [it for it in items if (it.id, spec.name) not in done]
        tag = oracle_tag(spec.oracle)
        if spec.oracle:
            log(f"{spec.name}: ORACLE method - it reads the gold answer at test time; its rows say oracle=true")
        if not pending:
            log(f"{spec.name}{tag}: all {len(items)} items already in {run.results}")
            written[spec.name] = 0
            continue
        if len(pending) < len(items):
            log(f"{spec.name}{tag}: resuming, {len(items) - len(pending)} of {len(items)} items already done")
        step = 1 if spec.refines and kept["refine_batching"] == "item" else batch_size
        bar = _progress(progress, spec.name + tag, len(items), len(items) - len(pending))
        written[spec.name] = 0
        try:
            with _activated(model, spec):
                refine = _default_refine() if spec.refines and refine_fn is None else refine_fn
                for start in range(0, len(pending), step):
                    batch = pending[start:start + step]
                    if spec.refines:
                        rows = _refine_batch(model, tokenizer, batch, spec, prompts, settings, refine, clock,
                                             kept["refine_sampling"], sample_cache)
                    elif spec.method in VOTE_METHODS:
                        rows = _vote_batch(model, tokenizer, batch, spec, prompts, settings, kept["refine_sampling"],
                                           sample_cache)
                    else:
                        rows = _batch(model, tokenizer, batch, spec, prompts, settings, generate_fn, clock,
                                      scoring, fmt.solution_prefix)
                    run.append(rows)
                    written[spec.name] += len(rows)
                    if bar is not None:
                        bar.update(len(rows))
                    if on_batch is not None:
                        on_batch(spec.name, rows)
        finally:
            if bar is not None:
                bar.close()
    return written


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
           scoring: str = "cached", solution_prefix: str = "") -> list[dict[str, Any]]:
    """One batch of base or vps: batched generation, then the gold-solution NLL."""
    texts = [prompts[it.id] for it in batch]
    rows = [_base_row(it, spec, prompts[it.id], len(batch)) for it in batch]
    if settings.generate:
        if spec.patched:
            reset_state(model)
        start = clock()
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
        scores = solution_nll(model, tokenizer, texts, [solution_prefix + it.answer for it in batch],
                              scoring=scoring)
        share = (clock() - start) / len(batch)
        for row, s in zip(rows, scores, strict=True):
            row.update(nll=_finite(s.nll), nll_tokens=s.tokens, nll_seconds=share)
            if not settings.generate:
                row["seconds"] = share
    return rows


def _refine_batch(model: Any, tokenizer: Any, batch: Sequence[Item], spec: MethodSpec, prompts: dict[str, str],
                  settings: RunSettings, refine_fn: Callable[..., Any],
                  clock: Callable[[], float], sampling: str, sample_cache: Any) -> list[dict[str, Any]]:
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
    results = refine_fn(model, tokenizer, [prompts[it.id] for it in batch], golds if spec.oracle else None,
                        iters=settings.refine_iters, mode="oracle" if spec.oracle else "self",
                        k_samples=settings.refine_k_samples, max_new_tokens=settings.max_new_tokens,
                        seed=settings.seed, sampling=sampling, sample_cache=sample_cache)
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
                settings: RunSettings, sampling: str, sample_cache: Any) -> list[dict[str, Any]]:
    """``maj@k`` / ``vps-maj@k``: a majority vote over k sampled completions per item.

    The samples are refinement's self-consistency samples (same temperature, seed, streams and cache),
    so next to ``refine-self`` with k samples, ``vps-maj@k`` votes over exactly the samples refinement
    drew and costs nothing more; a row's seconds are what drawing its samples cost, reused or not.
    The row's output is the first sample carrying the winning answer, read in the run's extraction mode.
    """
    from ..refine import SAMPLE_TEMPERATURE, draw_samples
    from ..verify import CompositeVerifier
    from ..verify.consistency import majority_answer

    fingerprint, drawn = draw_samples(model, tokenizer, [prompts[it.id] for it in batch], spec.votes,
                                      settings.max_new_tokens, SAMPLE_TEMPERATURE, settings.seed, sampling,
                                      sample_cache)
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
