"""`RefineConfig`: the settings of one refinement run, validated once, shared by every caller.

`refine` and `refine_many`, the evaluation harness (`RunSettings.refine_config`), the samples'
`settings_fingerprint` and ``vps refine`` all take one of these. Kept free of torch, so the CLI's
parser can read the choices (`MODES`, `SAMPLINGS`) without loading a model stack.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..prompting import check_stop_strings
from ..verify.extract import EXTRACT_MODES

__all__ = ["MAX_SAMPLES", "MAX_SEED", "MODES", "SAMPLE_TEMPERATURE", "SAMPLINGS", "RefineConfig", "check_seed"]

MODES = ("self", "oracle")
SAMPLINGS = ("streams", "global")
SAMPLE_TEMPERATURE = 0.7  # of the self-consistency samples (and of the maj@k baselines that vote over them)
#: Most samples per prompt (``k_samples``, and k of ``maj@k``): the k completions of a prompt are drawn from one
#: random stream in one generate call, so k sets the memory of that call; a million asked for 6 GB in 41 s.
MAX_SAMPLES = 64
#: Seeds are whole numbers in [0, MAX_SEED]: torch takes up to 2**64 - 1, Python's random any size, and a
#: seed outside both failed only after a run had written its settings.
MAX_SEED = 2**63 - 1


def check_seed(seed: object, field: str = "seed") -> None:
    """Refuse a seed torch and Python's random cannot both take (`RefineConfigError` naming ``field``)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise RefineConfigError(field, f"{field} must be a whole number in [0, 2**63 - 1], got {seed!r}")

# Keyword names `refine` accepted before RefineConfig, mapped to its fields.
_ALIASES = {"sample_temperature": "temperature"}


class RefineConfigError(ValueError):
    """A `RefineConfig` value that is invalid; ``field`` names it (the CLI maps it to its flag)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class RefineConfig:
    """How `refine` runs: ``iters`` decodes (>= 1), ``mode`` "self" (gold-free) or "oracle" (the gold
    answer is target and reference), ``k_samples`` self-consistency samples (>= 0) drawn at
    ``temperature`` (> 0 when any are drawn) with ``sampling`` "streams" or "global" (see
    `vps.refinement.loop`), ``max_new_tokens`` (>= 1) per decode and ``seed`` of the samples.
    ``stop_strings`` (non-empty texts; a list is kept as a tuple) end every decode and sample where one first
    appears, as they end generation in `vps.prompting.generate_texts`: a few-shot prompt's continuation
    otherwise runs on into made-up questions, and answers would be read from them. ``extract_mode`` (one of
    `vps.verify.EXTRACT_MODES`) is how answers are read from the samples and the candidates, so the votes,
    the target answer and the chosen candidate follow the same rule as the run's scoring.
    ``checkpoint_activations`` makes each refinement step keep only the decoder blocks' inputs for its
    backward and recompute the rest (`vps.refinement.checkpointing`): less memory, one more forward of the
    blocks, the same numbers (so it is in no fingerprint).

    An invalid value raises `RefineConfigError` (a ValueError) naming its field.
    """

    iters: int = 3
    mode: str = "self"
    k_samples: int = 4
    max_new_tokens: int = 256
    seed: int = 0
    temperature: float = SAMPLE_TEMPERATURE
    sampling: str = "streams"
    stop_strings: tuple[str, ...] = ()
    extract_mode: str = "flexible"
    checkpoint_activations: bool = False

    def __post_init__(self) -> None:
        if self.extract_mode not in EXTRACT_MODES:
            raise RefineConfigError("extract_mode", f"extract_mode must be one of {EXTRACT_MODES}, "
                                                    f"got {self.extract_mode!r}")
        try:
            object.__setattr__(self, "stop_strings", check_stop_strings(self.stop_strings))
        except ValueError as exc:
            raise RefineConfigError("stop_strings", str(exc)) from None
        if not isinstance(self.checkpoint_activations, bool):
            raise RefineConfigError("checkpoint_activations", f"checkpoint_activations must be True or False, got "
                                                              f"{self.checkpoint_activations!r}")
        for name in ("iters", "k_samples", "max_new_tokens", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise RefineConfigError(name, f"{name} must be a whole number, got {value!r}")
        if self.mode not in MODES:
            raise RefineConfigError("mode", f"mode must be one of {MODES}, got {self.mode!r}")
        if self.iters < 1:
            raise RefineConfigError("iters", f"iters must be >= 1, got {self.iters}")
        if not 0 <= self.k_samples <= MAX_SAMPLES:
            raise RefineConfigError("k_samples", f"k_samples must be in [0, {MAX_SAMPLES}], got {self.k_samples}")
        check_seed(self.seed)
        if self.max_new_tokens < 1:
            raise RefineConfigError("max_new_tokens", f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.sampling not in SAMPLINGS:
            raise RefineConfigError("sampling", f"sampling must be one of {SAMPLINGS}, got {self.sampling!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)):
            raise RefineConfigError("temperature", f"temperature (refine's sample_temperature) must be a number, "
                                                   f"got {self.temperature!r}")
        # Without samples the temperature is never used, so only a run that draws some needs a usable one.
        if self.k_samples and not self.temperature > 0:
            raise RefineConfigError("temperature", f"temperature (refine's sample_temperature) must be > 0 to "
                                                   f"draw samples, got {self.temperature}")

    @property
    def oracle(self) -> bool:
        """Whether the run reads the gold answer (``mode="oracle"``)."""
        return self.mode == "oracle"

    def replace(self, **changes: Any) -> RefineConfig:
        """A validated copy with some fields changed; an unknown name raises TypeError naming it."""
        _check_names(changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict."""
        return dataclasses.asdict(self)

    @classmethod
    def resolve(cls, config: RefineConfig | None = None, **overrides: Any) -> RefineConfig:
        """``config`` (default: the defaults) with keyword ``overrides``, the way `refine` takes them:
        field names, or ``sample_temperature`` for ``temperature``."""
        if config is not None and not isinstance(config, RefineConfig):
            raise TypeError(f"config must be a RefineConfig, got {type(config).__name__} (pass the other "
                            f"settings by keyword, e.g. iters=3)")
        changes = {}
        for name, value in overrides.items():
            field = _ALIASES.get(name, name)
            if field in changes:
                raise TypeError(f"{name!r} and {field!r} both set the same field; give one")
            changes[field] = value
        base = config if config is not None else cls()
        return base.replace(**changes) if changes else base


def _check_names(changes: dict[str, Any]) -> None:
    known = [f.name for f in dataclasses.fields(RefineConfig)]
    unknown = sorted(set(changes) - set(known))
    if unknown:
        raise TypeError(f"unknown refine setting(s) {unknown}; RefineConfig fields: {known}")
