"""Prompt formatting and batched greedy/sampled generation shared by the CLI, refine and eval."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where it is used, so the CLI can read PROMPT_STYLES without it
    import torch

DEFAULT_SYSTEM = ("You are a careful math tutor. Solve the problem step by step, then give the final answer "
                  "on its own line as '#### <number>'.")
# The Qwen2.5 family's own chain-of-thought convention (its math evaluations use this system prompt).
BOXED_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."

# "tutor" and "boxed" wrap the question in the tokenizer's chat template under a system prompt;
# "fewshot" is lm-evaluation-harness's plain-text GSM8K format: k solved "Question: ... Answer: ..."
# pairs, then the question and "Answer:", with no chat template.
CHAT_STYLES = ("tutor", "boxed")
PROMPT_STYLES = (*CHAT_STYLES, "fewshot")
# Where a few-shot continuation starts the next example, so generation stops there.
DEFAULT_STOP_STRINGS = ("\nQuestion:", "\n\nQ:")


def check_stop_strings(values: object) -> tuple[str, ...]:
    """``values`` as a tuple of stop strings, checked: a list or tuple of non-empty texts. A ValueError
    otherwise, worded for every caller (`vps.evaluation.settings.RunSettings`, `vps.refinement.RefineConfig`,
    the ``--stop`` flags), which add the field or flag it came from."""
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"stop strings must be a list of strings, got {values!r}")
    for stop in values:
        if not isinstance(stop, str) or not stop:
            # An empty string is found at position 0 of every text, so it would stop every output at once.
            raise ValueError(f"stop strings must be non-empty text, got {stop!r} (an empty one would stop every "
                             f"output before its first token)")
    return tuple(values)
DEFAULT_STYLE = "tutor"
# Solved examples in a fewshot prompt: lm-eval's GSM8K setting. `vps eval`, `vps tune`, their run settings and
# `PromptFormat` all take this default from here.
DEFAULT_SHOTS = 5
# The most solved examples a fewshot prompt may show: far more than any published GSM8K setting (5 or 8), and
# few enough that the prompt's size is a setting, not an accident (100,000 asked for every train item, then
# overflowed). `PromptSettings` refuses a count outside [1, MAX_SHOTS].
MAX_SHOTS = 64
_STYLE_SYSTEMS: dict[str, str | None] = {"tutor": DEFAULT_SYSTEM, "boxed": BOXED_SYSTEM, "fewshot": None}


class PromptSettingError(ValueError):
    """A prompt setting that breaks a rule of `PromptSettings`. ``field`` names it as run settings, study
    settings and flags do (``prompt``, ``shots``, ``system``); ``reason`` is the rule's wording after that
    name, so a command puts its flag in front instead (`named`), and every entry point reads the same."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field} {reason}")
        self.field = field
        self.reason = reason

    def named(self, name: str) -> str:
        """The message with ``name`` (a flag such as ``--shots``) in place of the field's name."""
        return f"{name} {self.reason}"


def _check_style(style: str, system: str | None = None) -> None:
    """The prompt style is one of `PROMPT_STYLES`, and only a chat style takes a system prompt."""
    if style not in PROMPT_STYLES:
        raise PromptSettingError("prompt", f"must be one of {PROMPT_STYLES}, got {style!r}")
    if style == "fewshot" and system is not None:
        raise PromptSettingError("system", "cannot be given with the fewshot prompt, which uses no chat template")


def style_system(style: str, system: str | None = None) -> str | None:
    """The system prompt a prompt style uses: ``system`` where given, else the style's own (fewshot: none)."""
    return system if system is not None else _STYLE_SYSTEMS[style]


@dataclass(frozen=True)
class PromptFormat:
    """How a question becomes a prompt: a style, its system prompt, and (fewshot) the solved examples."""

    style: str = "tutor"
    system: str | None = None  # chat styles: None means the style's own system prompt
    shots: tuple[tuple[str, str], ...] = ()  # fewshot: a pool of (question, worked answer) pairs, in order
    n_shots: int = DEFAULT_SHOTS  # fewshot: how many of the pool each prompt shows

    def __post_init__(self) -> None:
        _check_style(self.style, self.system)  # the same rules, and words, as `PromptSettings`
        if self.n_shots < 0:
            raise ValueError(f"n_shots must be >= 0, got {self.n_shots}")
        if self.style == "fewshot" and self.n_shots and len(self.shots) < self.n_shots + 1:
            raise ValueError(f"fewshot needs a pool of n_shots + 1 = {self.n_shots + 1} examples (one spare for "
                             f"an item that is itself a shot), got {len(self.shots)}")

    @property
    def system_text(self) -> str | None:
        """The system prompt the style uses (None for fewshot)."""
        return style_system(self.style, self.system)

    @property
    def solution_prefix(self) -> str:
        """What separates the prompt from a scored gold solution ("Answer:" is followed by a space)."""
        return " " if self.style == "fewshot" else ""

    def render(self, tokenizer: Any, question: str) -> str:
        """The prompt for ``question``; fewshot shows the first ``n_shots`` examples of the pool that are
        not this very question, so an item of the shots' own split never sees its own solution."""
        if self.style != "fewshot":
            return chat_prompt(tokenizer, question, system=self.system_text)
        shots = [(q, a) for q, a in self.shots if q.strip() != question.strip()][:self.n_shots]
        blocks = [f"Question: {q}\nAnswer: {a}" for q, a in shots]
        return "\n\n".join([*blocks, f"Question: {question}\nAnswer:"])


@dataclass(frozen=True)
class PromptSettings:
    """The prompt settings `vps eval` and `vps tune` share (``--prompt``, ``--shots``, ``--system``): the
    prompt ``style`` (`PROMPT_STYLES`), the solved examples of a fewshot prompt (``shots``) and a chat
    style's ``system`` prompt (None: the style's own). Their run settings store the three as ``prompt``,
    ``shots`` and ``system``; `format` is the `PromptFormat` they describe.

    The rules of a prompt live here, and every entry point (`RunSettings`, `TuneSettings`, the flags of
    ``vps eval``, ``vps ablate`` and ``vps tune``) checks them by building one: the style is one of
    `PROMPT_STYLES`, ``shots`` is in [1, `MAX_SHOTS`] (whatever the style, so a stored setting is always
    valid), and the fewshot style takes no system prompt. A broken rule raises `PromptSettingError`, naming
    the field as the run settings do."""

    style: str = DEFAULT_STYLE
    shots: int = DEFAULT_SHOTS
    system: str | None = None

    def __post_init__(self) -> None:
        _check_style(self.style, self.system)
        if not 1 <= self.shots <= MAX_SHOTS:
            raise PromptSettingError("shots", f"must be in [1, {MAX_SHOTS}], got {self.shots}")

    def format(self) -> PromptFormat:
        """The `PromptFormat`; a fewshot one reads its examples from the start of GSM8K train (one spare
        for an item that is itself a shot)."""
        if self.style != "fewshot":
            return PromptFormat(self.style, self.system)
        from .evaluation.data import load_items  # the data loader is needed only for a fewshot pool

        pool = load_items("gsm8k:train", limit=self.shots + 1).items
        return PromptFormat("fewshot", shots=tuple((it.question, it.answer) for it in pool), n_shots=self.shots)


def chat_prompt(tokenizer: Any, question: str, system: str | None = DEFAULT_SYSTEM) -> str:
    """The question wrapped in the tokenizer's chat template, ready for the assistant's turn."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    text = (system + "\n\n" if system else "") + f"Question: {question}\nAnswer:"
    return text


def encode(tokenizer: Any, texts: Sequence[str], device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Left-padded batch (input_ids, attention_mask) for generation."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(list(texts), return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    return {k: v.to(device) if device is not None else v for k, v in enc.items()
            if k in ("input_ids", "attention_mask")}


class ContextLengthWarning(UserWarning):
    """A prompt (plus the tokens asked for) is longer than the model's context window."""


def check_context(model: Any, input_ids: torch.Tensor, max_new_tokens: int) -> None:
    """Warn when prompt + ``max_new_tokens`` exceeds the model's ``max_position_embeddings``: past it the
    positions are ones the model never saw, and its output is unreliable (transformers says nothing)."""
    cfg: Any = getattr(model, "config", None)
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    limit = getattr(text_cfg, "max_position_embeddings", None) or getattr(text_cfg, "n_positions", None)
    if not isinstance(limit, int):
        return
    need = int(input_ids.shape[-1]) + max_new_tokens
    if need > limit:
        warnings.warn(f"vps: the prompt ({int(input_ids.shape[-1])} tokens, padded) plus max_new_tokens "
                      f"({max_new_tokens}) needs {need} positions, more than the model's context of {limit}; "
                      "outputs past it are unreliable", ContextLengthWarning, stacklevel=3)


def generation_kwargs(tokenizer: Any, max_new_tokens: int, temperature: float) -> dict[str, Any]:
    """``generate()`` arguments for greedy decoding (``temperature == 0``) or plain sampling."""
    kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=1.0, top_k=0)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kwargs


def decode_new_tokens(tokenizer: Any, new: torch.Tensor) -> tuple[list[str], list[int]]:
    """Text (padding and special tokens dropped) and token count of each row of generated ids."""
    texts, counts = [], []
    for row in new:
        keep = row[row != tokenizer.pad_token_id] if tokenizer.pad_token_id is not None else row
        texts.append(tokenizer.decode(keep, skip_special_tokens=True))
        counts.append(int(keep.numel()))
    return texts, counts


def generate_texts(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 256,
                   temperature: float = 0.0, seed: int | None = None, streamer: Any = None,
                   stop_strings: Sequence[str] | None = None,
                   logits_processors: Sequence[Any] = ()) -> tuple[list[str], list[int]]:
    """Generate a continuation for each prompt; returns (texts, number of new tokens per prompt).

    ``temperature == 0`` is greedy decoding. Generation stops at EOS, at ``max_new_tokens``, or at the
    first of ``stop_strings`` (trimmed from the text). ``logits_processors`` (transformers
    ``LogitsProcessor`` objects) run at every step, in order: refinement reads the first step's logits
    and draws its samples through them.
    """
    import torch

    if seed is not None:
        torch.manual_seed(seed)
    enc = encode(tokenizer, prompts, next(model.parameters()).device)
    check_context(model, enc["input_ids"], max_new_tokens)
    kwargs = generation_kwargs(tokenizer, max_new_tokens, temperature)
    kwargs["streamer"] = streamer
    if stop_strings:
        kwargs.update(stop_strings=list(stop_strings), tokenizer=tokenizer)
    if logits_processors:
        from transformers import LogitsProcessorList

        kwargs["logits_processor"] = LogitsProcessorList(list(logits_processors))
    with torch.no_grad():
        out = model.generate(**enc, **kwargs)
    texts, counts = decode_new_tokens(tokenizer, out[:, enc["input_ids"].shape[1]:])
    for i, text in enumerate(texts):
        for stop in stop_strings or ():
            cut = text.find(stop)
            if cut >= 0:
                text = text[:cut]
        texts[i] = text.strip()
    return texts, counts
