"""A run's settings: everything that decides its numbers, stored in ``run.json`` and checked on resume.

`RunSettings` validates every value when it is built (`SettingError` names the field, which ``vps eval``
turns into the flag); `data_info` is what run.json records about the items.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..prompting import (
    DEFAULT_SHOTS,
    DEFAULT_STOP_STRINGS,
    DEFAULT_STYLE,
    PromptFormat,
    PromptSettingError,
    PromptSettings,
    check_stop_strings,
    style_system,
)
from ..refinement.config import MAX_SAMPLES, RefineConfig, RefineConfigError, check_seed
from ..setting_flags import flag_field, flag_fields
from ..setting_flags import flag_of as setting_flag
from ..verify import EXTRACT_MODES
from .data import LoadResult

__all__ = ["MIN_TEMPERATURE", "RunSettings", "SettingError", "data_info", "flag_of", "run_flag_fields"]

# Below this a sampling temperature divides logits into float overflow (1e-300 made every probability NaN
# after the base rows were written); greedy decoding is temperature 0.
MIN_TEMPERATURE = 1e-4


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


def run_flag_fields() -> tuple[dataclasses.Field[Any], ...]:
    """The `RunSettings` fields declared as flags of ``vps eval`` / ``vps ablate``, in field order."""
    return flag_fields(RunSettings)


def flag_of(name: str) -> str | None:
    """The flag that sets `RunSettings` field ``name`` (None: none does)."""
    return setting_flag(RunSettings, name)


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
    ``shots`` solved examples from GSM8K train). ``system`` None means the style's own system prompt. The
    three are checked by `PromptSettings` (its rules and words; the field names are the same).
    ``refine_iters`` (>= 1) and ``refine_k_samples`` (>= 0) are the refine methods' iterations and
    self-consistency samples; a run with a refine method needs ``refine_k_samples >= 1`` (`check_run`):
    with none, self-consistency would be skipped without a word. Every float must be finite and every
    stop string non-empty. An invalid value raises `SettingError` naming its field.
    """

    # A field's ``flag`` is the command-line flag that sets it (`flag_of`); `flag_field` fields are declared as
    # flags of ``vps eval`` / ``vps ablate`` from their metadata alone (`vps.commands.common.add_setting_argument`),
    # the others by the argument groups they share with other commands (model, data, prompt).
    model: str = field(metadata={"flag": "--model"})
    data: dict[str, Any]
    dtype: str = field(default="float32", metadata={"flag": "--dtype"})
    generate: bool = True
    nll: bool = False
    max_new_tokens: int = flag_field(256, "--max-new-tokens", "most tokens generated per answer (default: %(default)s)")
    temperature: float = flag_field(0.0, "--temperature", "0 = greedy (default)")
    stop_strings: Sequence[str] = flag_field(
        DEFAULT_STOP_STRINGS, "--stop", "stop string, non-empty (repeatable); default: "
        + ", ".join(repr(s) for s in DEFAULT_STOP_STRINGS), repeatable=True, metavar="TEXT")
    system: str | None = field(default=None, metadata={"flag": "--system"})
    prompt: str = field(default=DEFAULT_STYLE, metadata={"flag": "--prompt"})
    shots: int = field(default=DEFAULT_SHOTS, metadata={"flag": "--shots"})
    extract_mode: str = flag_field(
        "flexible", "--extract", "answer extraction: flexible (first ####, else boxed / 'answer is' / last number), "
        "strict (#### only) or last (the last marker of any kind); see docs/verification.md", choices=EXTRACT_MODES)
    refine_iters: int = flag_field(3, "--iters", "refinement iterations (refine methods; >= 1)")
    refine_k_samples: int = flag_field(
        4, "--k-samples", "samples for self-consistency (refine methods; >= 1 when a refine method runs, since 0 "
        "would skip self-consistency)")
    seed: int = field(default=0, metadata={"flag": "--seed"})
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
        try:
            self.prompt_settings()
        except PromptSettingError as exc:
            raise SettingError(exc.field, str(exc)) from None
        if self.extract_mode not in EXTRACT_MODES:
            raise SettingError("extract_mode",
                               f"extract_mode must be one of {EXTRACT_MODES}, got {self.extract_mode!r}")
        try:
            self.stop_strings = list(check_stop_strings(self.stop_strings))
        except ValueError as exc:
            raise SettingError("stop_strings", str(exc)) from None

    def prompt_settings(self) -> PromptSettings:
        """The run's `PromptSettings` (``prompt``, ``shots``, ``system``), which check them."""
        return PromptSettings(self.prompt, self.shots, self.system)

    def prompt_format(self) -> PromptFormat:
        """The run's `PromptFormat` (`PromptSettings.format`)."""
        return self.prompt_settings().format()

    def refine_config(self, **changes: Any) -> RefineConfig:
        """The refine methods' `RefineConfig` (and the vote methods' sample settings), with ``changes``: its
        decodes and samples stop at the run's stop strings, as the base and vps methods' generation does, and
        read answers in the run's extraction mode.

        The samples' temperature is refinement's own (`SAMPLE_TEMPERATURE`): ``temperature`` is the
        base and vps methods' decoding, which the run.json field keeps its name for.
        """
        return RefineConfig(iters=self.refine_iters, k_samples=self.refine_k_samples,
                            max_new_tokens=self.max_new_tokens, seed=self.seed,
                            stop_strings=tuple(self.stop_strings),
                            extract_mode=self.extract_mode).replace(**changes)

    def to_dict(self) -> dict[str, Any]:
        """The settings as run.json records them: the system prompt the style uses, and ``shots`` only for a
        fewshot prompt (`vps.evaluation.rundir.run_record` adds the format, the version and the configurations)."""
        out = dataclasses.asdict(self)
        out["system"] = style_system(self.prompt, self.system)
        if self.prompt != "fewshot":
            del out["shots"]
        return out

