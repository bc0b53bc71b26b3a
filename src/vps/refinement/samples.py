"""Self-consistency samples: the per-prompt random streams that draw them, and a cache that reuses them.

A prompt's samples depend only on the prompt, the patched configuration and the sampling settings:
they are drawn from a fresh state from a stream seeded with ``seed``. ``refine-self`` and
``refine-oracle`` on the same items therefore draw identical samples, and with one `SampleCache` the
second reuses them. A cache entry can be written out as a record (`DrawnSamples.to_record`, kept in a
refine row) and restored from it (`SampleCache.restore`), so the reuse survives a resumed run.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from transformers import LogitsProcessor

from ..verify import Answer
from .config import RefineConfig

__all__ = ["DrawnSamples", "SampleCache", "StreamSampler", "settings_fingerprint"]


def settings_fingerprint(refine: RefineConfig, config: Any) -> str:
    """A short digest of everything besides the prompt that a prompt's samples depend on: ``refine``'s
    sample settings (not ``iters`` nor ``mode``: refine-self and refine-oracle share samples) and the
    patched ``config`` (None when unpatched).

    Stored sample records are matched against this digest, so its input stays the tuple it always was; stop
    strings and the extraction mode (the records keep the answers read from the samples), added later, join
    it only when they are not the defaults.
    """
    fields: tuple[Any, ...] = (refine.k_samples, refine.max_new_tokens, float(refine.temperature), refine.seed,
                               refine.sampling, repr(config))
    if refine.stop_strings:
        fields += (refine.stop_strings,)
    if refine.extract_mode != "flexible":
        fields += (("extract", refine.extract_mode),)
    text = repr(fields)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass
class DrawnSamples:
    """One prompt's self-consistency samples: answers, tokens generated, seconds spent drawing them."""

    answers: list[Answer | None]
    tokens: int
    seconds: float
    reused: bool = False
    texts: list[str] | None = None  # the completions themselves (records written before they were kept lack them)

    def to_record(self, fingerprint: str) -> dict[str, Any]:
        """JSON-ready form, tagged with the `settings_fingerprint` the samples were drawn with."""
        record = {"settings": fingerprint, "answers": [None if a is None else asdict(a) for a in self.answers],
                  "tokens": self.tokens, "seconds": self.seconds}
        if self.texts is not None:
            record["texts"] = list(self.texts)
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> tuple[str, DrawnSamples]:
        """(fingerprint, samples) of a `to_record` dict; ValueError naming the field that is wrong."""
        if not isinstance(record, dict):
            raise ValueError(f"a sample record must be a dict, got {type(record).__name__}")
        for name, kind in (("settings", str), ("answers", list), ("tokens", int), ("seconds", (int, float))):
            if not isinstance(record.get(name), kind):
                raise ValueError(f"sample record field {name!r} is missing or not a {kind}: {record.get(name)!r}")
        try:
            answers = [None if a is None else Answer(**a) for a in record["answers"]]
        except (TypeError, ValueError) as exc:
            raise ValueError(f"sample record field 'answers' holds an invalid answer: {exc}") from None
        texts = record.get("texts")
        if texts is not None and (not isinstance(texts, list) or len(texts) != len(answers)
                                  or not all(isinstance(t, str) for t in texts)):
            raise ValueError(f"sample record field 'texts' must be a list of {len(answers)} strings")
        return record["settings"], cls(answers, record["tokens"], float(record["seconds"]), texts=texts)


class SampleCache:
    """Self-consistency samples kept by prompt and `settings_fingerprint`, for calls that would draw
    the same ones. Use one cache per model."""

    def __init__(self) -> None:
        self._store: dict[tuple[str, str], DrawnSamples] = {}

    def __len__(self) -> int:
        return len(self._store)

    @property
    def prompts(self) -> int:
        """How many distinct prompts have samples (one prompt can hold sets drawn with several settings)."""
        return len({prompt for prompt, _ in self._store})

    def get(self, prompt: str, fingerprint: str) -> DrawnSamples | None:
        """The samples stored for ``prompt`` drawn with these settings, marked reused, or None."""
        found = self._store.get((prompt, fingerprint))
        return None if found is None else replace(found, reused=True)

    def put(self, prompt: str, fingerprint: str, drawn: DrawnSamples) -> None:
        """Store one prompt's samples."""
        self._store[(prompt, fingerprint)] = replace(drawn, reused=False)

    def restore(self, prompt: str, record: dict[str, Any]) -> None:
        """Store the samples a `DrawnSamples.to_record` record holds (from an earlier run's row).

        A record drawn with other settings is kept too: its fingerprint never matches those calls.
        """
        fingerprint, drawn = DrawnSamples.from_record(record)
        self.put(prompt, fingerprint, drawn)


class StreamSampler(LogitsProcessor):
    """Sampling at ``temperature`` with one random stream per group of ``group_size`` consecutive rows.

    Used with greedy `generate`: the argmax of ``logits / T + Gumbel noise`` is an exact draw from
    ``softmax(logits / T)``. Group g's noise comes from its own generator, seeded with ``seed`` and
    consumed in the same order whatever the other groups do, so a group's draws do not depend on the
    batch it is in. The noise is float64: an exponential draw of exactly 0 (an infinite Gumbel value
    that would force its token) then has probability ~2**-53 instead of ~2**-24 per vocabulary entry.
    """

    def __init__(self, groups: int, group_size: int, temperature: float, seed: int,
                 device: torch.device | str = "cpu") -> None:
        if groups < 1 or group_size < 1:
            raise ValueError(f"groups and group_size must be >= 1, got {groups} and {group_size}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.group_size, self.temperature = group_size, temperature
        self.generators = [torch.Generator(device=device).manual_seed(seed) for _ in range(groups)]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        rows = len(self.generators) * self.group_size
        if scores.shape[0] != rows:
            raise ValueError(f"StreamSampler was built for {rows} rows, got scores for {scores.shape[0]}")
        noise = torch.cat([
            torch.empty(self.group_size, scores.shape[-1], dtype=torch.float64, device=scores.device)
            .exponential_(generator=g) for g in self.generators
        ])
        gumbel = -noise.clamp_min_(torch.finfo(torch.float64).tiny).log_()
        return (scores.double() / self.temperature + gumbel).to(scores.dtype)
