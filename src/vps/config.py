"""`VPSConfig`: every knob of Virtual Parameter Sharpening in one validated, JSON-round-trippable dataclass.

The seed specification's defaults (rank 2, topk 32, gamma 0.5, tau 0.8, builder "hybrid", order 1,
Q/K coupling, L-BFGS, adaptive rank and gamma, alpha 1e-3) are the defaults here. The adaptive policy
interpolates between bounds; by default the configured value is the *upper* bound (a low-energy layer
gets less perturbation, never more than the user asked for).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._version import __version__

BUILDERS = ("sk", "sc", "hybrid")
SCOPES = ("sequence", "batch")
DECODE_MODES = ("frozen", "dynamic")
# The seed specification's range of gamma: beyond it the rank-r term swamps W x and outputs degenerate
# (gamma 1e9 gave blank text) while every forward still looks finite.
GAMMA_MAX = 1.0
#: The file `VPSConfig.save_pretrained` writes into a directory and `VPSConfig.from_pretrained` reads from one
#: (PEFT's ``adapter_config.json`` convention).
CONFIG_NAME = "vps_config.json"


class ConfigError(ValueError):
    """A `VPSConfig` field holds a value outside its allowed range."""


class UnknownFieldError(ConfigError, TypeError):
    """A name that is not a `VPSConfig` field. Also a TypeError, which is what Python raises for an
    unexpected keyword argument, so code that caught that before still catches this."""


@dataclass(frozen=True)
class VPSConfig:
    """Configuration of a VPS patch.

    Core (seed table): ``rank`` r of the perturbation, ``topk`` k >= r candidate pool (SC),
    ``gamma`` scale, ``tau`` per-component clip, ``builder`` ("sk" | "sc" | "hybrid"), ``order``
    (1 or 2), ``qk_coupling``, ``lbfgs_enabled``, ``adaptive_rank``, ``adaptive_gamma``, ``alpha``
    (ridge regularisation of SC).

    Targeting: ``target_modules`` (None = per-architecture default; a string is a full-match regex
    over module names, a list matches names or name suffixes), ``exclude_modules`` (same rules),
    ``layers`` (indices of transformer blocks to patch; None = all).

    Statistics and decoding: ``scope`` "sequence" (each prompt's own valid tokens) or "batch"
    (the seed's batch-level statistics); ``decode_mode`` "frozen" (selectors built at prefill are
    kept for KV-cached decoding) or "dynamic" (rebuilt each step, as the reference code does).

    Policy bounds: ``rank_bounds``, ``gamma_bounds``, ``topk_bounds``, ``order_bounds`` are
    (lo, hi) pairs used when the matching ``adaptive_*`` flag is on; None means (1, rank),
    (0, gamma), (topk, topk) and (1, order). ``use_entropy`` feeds the model's next-token entropy
    to the policy; ``history_size`` and ``history_step`` set the improvement-history rule.

    The config is frozen: patched layers cache values derived from it, so a change after `vps.patch`
    would apply by halves; use `replace` for a changed copy. ``version`` records the library that wrote
    it and takes no part in equality.

    Gradient and L-BFGS: ``grad_eta`` is how far (relative to the target's RMS) the SC regression
    target moves against a captured gradient; ``lbfgs_m`` memory pairs; ``lbfgs_scale`` step scale
    (seed: 1e-3) of the per-layer gain update during refinement.

    ``damping`` flips the sign of the perturbation (the series at ``-gamma``): it weakens the selected
    directions instead of sharpening them, outside the seed's method; `vps tune` searches it only when
    a space file allows it, and labels it DAMPING (docs/design.md §1).
    """

    # The fields `vps generate / eval / refine` expose carry their flag, help and choices here, once:
    # `vps.commands.common.add_config_arguments` builds the flags from this metadata (`cli_fields`). A help
    # text's "{default}" is filled with the field's default there. A switch ("sets") is a flag without a
    # value that sets its field(s) to that value; fields sharing a flag are set together.
    rank: int = field(default=2, metadata={
        "flag": "--rank", "help": "rank r of the perturbation (the policy's upper bound; default {default})"})
    topk: int = field(default=32, metadata={
        "flag": "--topk", "help": "candidate features the selectors choose among, >= rank (default {default}; a "
                                  "larger --rank widens it to match)"})
    gamma: float = field(default=0.5, metadata={
        "flag": "--gamma",
        "help": f"perturbation scale in [0, {GAMMA_MAX}] (the policy's upper bound; default {{default}})"})
    tau: float = field(default=0.8, metadata={
        "flag": "--tau", "help": "clip on each rank-1 term's spectral norm, > 0 (default {default})"})
    builder: str = field(default="hybrid", metadata={
        "flag": "--builder", "choices": BUILDERS,
        "help": "selector builder: sk (activation statistics), sc (ridge-refined), hybrid (sc where a gradient "
                "was captured, else sk) (default {default})"})
    order: int = field(default=1, metadata={
        "flag": "--order", "choices": (1, 2),
        "help": "terms of the series W sum (gamma U V^T W)^j (default {default})"})
    qk_coupling: bool = field(default=True, metadata={
        "flag": "--no-qk-coupling", "sets": False,
        "help": "select query and key dimensions independently (default: coupled)"})
    lbfgs_enabled: bool = True
    adaptive_rank: bool = field(default=True, metadata={
        "flag": "--fixed", "sets": False,
        "help": "turn the adaptive policy off: rank and gamma exactly as given (default: adaptive)"})
    adaptive_gamma: bool = field(default=True, metadata={"flag": "--fixed", "sets": False})
    alpha: float = 1e-3

    target_modules: str | list[str] | None = None
    exclude_modules: str | list[str] | None = None
    layers: list[int] | None = None
    scope: str = "sequence"
    decode_mode: str = field(default="frozen", metadata={
        "flag": "--decode-mode", "choices": DECODE_MODES,
        "help": "frozen: decode steps keep the selectors built from the prompt; dynamic: rebuild them every step "
                "(default {default})"})

    adaptive_topk: bool = False
    adaptive_order: bool = False
    rank_bounds: tuple[int, int] | None = None
    gamma_bounds: tuple[float, float] | None = None
    topk_bounds: tuple[int, int] | None = None
    order_bounds: tuple[int, int] | None = None
    use_entropy: bool = True
    history_size: int = 8
    history_step: float = 0.1

    grad_eta: float = 0.1
    lbfgs_m: int = 5
    lbfgs_scale: float = 1e-3

    damping: bool = False

    version: str = field(default=__version__, compare=False)

    def __post_init__(self) -> None:
        # JSON turns tuples into lists; accept both so save/load round-trips.
        for name in ("rank_bounds", "gamma_bounds", "topk_bounds", "order_bounds"):
            value = getattr(self, name)
            if value is not None:
                if not isinstance(value, (list, tuple)) or len(value) != 2:
                    raise ConfigError(f"{name} must be a (lo, hi) pair, got {value!r}")
                object.__setattr__(self, name, tuple(value))
        if isinstance(self.layers, tuple):
            object.__setattr__(self, "layers", list(self.layers))
        self.validate()

    # -- validation -------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise `ConfigError` naming the first field outside its allowed range."""
        _int_at_least("rank", self.rank, 1)
        _int_at_least("topk", self.topk, 1)
        if self.topk < self.rank:
            raise ConfigError(f"topk must be >= rank (the candidate pool holds the rank), got topk={self.topk}"
                              f" < rank={self.rank}")
        _finite_in("gamma", self.gamma, 0.0, GAMMA_MAX)
        _finite_positive("tau", self.tau)
        _finite_positive("alpha", self.alpha)
        if self.builder not in BUILDERS:
            raise ConfigError(f"builder must be one of {BUILDERS}, got {self.builder!r}")
        if self.order not in (1, 2):
            raise ConfigError(f"order must be 1 or 2, got {self.order!r}")
        if self.scope not in SCOPES:
            raise ConfigError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if self.decode_mode not in DECODE_MODES:
            raise ConfigError(f"decode_mode must be one of {DECODE_MODES}, got {self.decode_mode!r}")
        for name in ("qk_coupling", "lbfgs_enabled", "adaptive_rank", "adaptive_gamma", "adaptive_topk",
                     "adaptive_order", "use_entropy", "damping"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be a bool, got {getattr(self, name)!r}")
        _check_targets("target_modules", self.target_modules)
        _check_targets("exclude_modules", self.exclude_modules)
        if self.layers is not None:
            if not isinstance(self.layers, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layers
            ):
                raise ConfigError(f"layers must be a list of non-negative ints, got {self.layers!r}")
        _int_at_least("history_size", self.history_size, 1)
        _finite_at_least("history_step", self.history_step, 0.0)
        _finite_at_least("grad_eta", self.grad_eta, 0.0)
        _int_at_least("lbfgs_m", self.lbfgs_m, 1)
        _finite_at_least("lbfgs_scale", self.lbfgs_scale, 0.0)

        r_lo, r_hi = self.resolved_rank_bounds
        _int_at_least("rank_bounds[0]", r_lo, 1)
        _ordered("rank_bounds", r_lo, r_hi)
        g_lo, g_hi = self.resolved_gamma_bounds
        _finite_in("gamma_bounds[0]", g_lo, 0.0, GAMMA_MAX)
        _finite_in("gamma_bounds[1]", g_hi, 0.0, GAMMA_MAX)
        _ordered("gamma_bounds", g_lo, g_hi)
        k_lo, k_hi = self.resolved_topk_bounds
        _ordered("topk_bounds", k_lo, k_hi)
        if k_lo < self.max_rank:
            raise ConfigError(f"topk_bounds[0] must be >= the largest rank {self.max_rank}, got {k_lo}")
        o_lo, o_hi = self.resolved_order_bounds
        if o_lo not in (1, 2) or o_hi not in (1, 2):
            raise ConfigError(f"order_bounds must lie in {{1, 2}}, got {(o_lo, o_hi)}")
        _ordered("order_bounds", o_lo, o_hi)

    # -- resolved bounds ------------------------------------------------------------------------
    @property
    def resolved_rank_bounds(self) -> tuple[int, int]:
        """(lo, hi) of the rank; equal to (rank, rank) when rank is not adaptive."""
        if not self.adaptive_rank:
            return (self.rank, self.rank)
        return self.rank_bounds if self.rank_bounds is not None else (1, self.rank)

    @property
    def resolved_gamma_bounds(self) -> tuple[float, float]:
        """(lo, hi) of gamma; equal to (gamma, gamma) when gamma is not adaptive."""
        if not self.adaptive_gamma:
            return (self.gamma, self.gamma)
        return self.gamma_bounds if self.gamma_bounds is not None else (0.0, self.gamma)

    @property
    def resolved_topk_bounds(self) -> tuple[int, int]:
        """(lo, hi) of top-k; equal to (topk, topk) when top-k is not adaptive."""
        if not self.adaptive_topk:
            return (self.topk, self.topk)
        return self.topk_bounds if self.topk_bounds is not None else (self.topk, self.topk)

    @property
    def resolved_order_bounds(self) -> tuple[int, int]:
        """(lo, hi) of the order; equal to (order, order) when the order is not adaptive."""
        if not self.adaptive_order:
            return (self.order, self.order)
        return self.order_bounds if self.order_bounds is not None else (1, self.order)

    @property
    def want_entropy(self) -> bool:
        """Whether a patched model measures its next-token entropy after each forward: only dynamic
        decoding rebuilds decisions from it, and only an adaptive knob can respond to it."""
        return self.use_entropy and self.decode_mode == "dynamic" and (
            self.adaptive_rank or self.adaptive_gamma or self.adaptive_topk or self.adaptive_order)

    @property
    def max_rank(self) -> int:
        """Largest rank any forward can use: the static width of every selector tensor."""
        return self.resolved_rank_bounds[1]

    @property
    def max_topk(self) -> int:
        """Largest candidate pool any forward can use."""
        return self.resolved_topk_bounds[1]

    # -- serialisation ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field (tuples become lists)."""
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VPSConfig:
        """Build a config from a dict; unknown keys raise `UnknownFieldError` (a `ConfigError`) naming
        them and the nearest field names."""
        check_field_names(data)
        return cls(**data)

    def replace(self, **overrides: Any) -> VPSConfig:
        """A validated copy with some fields changed (unknown names raise `ConfigError`)."""
        data = self.to_dict()
        data.update(overrides)
        return VPSConfig.from_dict(data)

    def with_overrides(self, **overrides: Any) -> VPSConfig:
        """`replace`, with the override rules of `from_overrides`: a ``rank`` beyond this config's topk, with
        no topk among ``overrides``, widens topk to match (`pool_for`) rather than failing."""
        return VPSConfig.from_overrides(overrides, base=self)

    @classmethod
    def from_overrides(cls, overrides: Mapping[str, Any], *, base: VPSConfig | None = None,
                       source: str | None = None, allow_damping: bool = False) -> VPSConfig:
        """``base`` (None: the seed defaults) with ``overrides`` applied, validated: the one place the
        override rules live, shared by the CLI flags, ablation grids, bench specs, the tune space and
        trials, lm-eval's ``vps_config`` and the keyword overrides of `vps.patch` / `vps.patched`.

        Rules: a ``rank`` beyond the base's topk, with no ``topk`` among ``overrides``, widens topk to
        the rank (`pool_for`: the candidate pool must hold the rank) instead of failing; with
        ``allow_damping`` (the tune space, where a file allows it) a negative ``gamma`` means
        ``damping`` with gamma's magnitude, elsewhere it is out of range like any other value.

        Raises:
            ConfigError: an unknown field (`UnknownFieldError`, with the nearest name) or a value out of
                range; the message starts with ``source`` (the file, flag or spec the overrides came
                from) when one is given, and names the field.
        """
        base = base if base is not None else cls()
        values = dict(overrides)
        rank = values.get("rank")
        if isinstance(rank, int) and not isinstance(rank, bool) and "topk" not in values and rank > base.topk:
            values["topk"] = cls.pool_for(rank, base.topk)
        gamma = values.get("gamma")
        if allow_damping and isinstance(gamma, (int, float)) and not isinstance(gamma, bool) and gamma < 0:
            values.update(gamma=-gamma, damping=True)
        try:
            return base.replace(**values)
        except ConfigError as exc:
            if source is None:
                raise
            raise type(exc)(f"{source}: {exc}") from None

    @staticmethod
    def pool_for(rank: int, topk: int) -> int:
        """The candidate pool a rank needs: ``topk``, widened to ``rank`` where it is smaller (the pool
        must hold the rank)."""
        return max(topk, rank)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the config as JSON to the file ``path``, stamped with the library version.

        Raises:
            ConfigError: ``path`` is an existing directory (`save_pretrained` writes into one).
        """
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"{path} is a directory; VPSConfig.save writes a file: give a file name, or call "
                              f"save_pretrained({str(path)!r}) to write {path / CONFIG_NAME}")
        data = self.to_dict()
        data["version"] = __version__
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """Write the config as ``<directory>/vps_config.json`` (creating the directory), as PEFT's
        ``save_pretrained`` does; returns the file written. `from_pretrained` reads it back."""
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise ConfigError(f"save_pretrained: {directory} is a file, not a directory; VPSConfig.save writes "
                              f"a single file")
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / CONFIG_NAME
        self.save(path)
        return path

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> VPSConfig:
        """Read a config written by `save_pretrained` (a directory holding ``vps_config.json``) or by
        `save` (a JSON file); the same as `load`, under the name PEFT users look for."""
        return cls.load(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> VPSConfig:
        """Read a config written by `save` (a JSON file) or by `save_pretrained` (a directory: its
        ``vps_config.json`` is read). Errors name the file.

        Raises:
            ConfigError: the file is missing or not valid JSON, the directory holds no ``vps_config.json``,
                or a field is unknown (the message suggests the nearest name) or out of range.
        """
        path = Path(path)
        if path.is_dir():
            if not (path / CONFIG_NAME).is_file():
                raise ConfigError(f"config directory {path} holds no {CONFIG_NAME} (VPSConfig.save_pretrained "
                                  f"writes one)")
            path = path / CONFIG_NAME
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a JSON object, got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise type(exc)(f"{path}: {exc}") from None


FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(VPSConfig))


def cli_fields() -> tuple[dataclasses.Field[Any], ...]:
    """The `VPSConfig` fields the command line sets, in declaration order: those whose metadata names a
    ``flag`` (with its ``help``, and ``choices`` or ``sets`` where it has them)."""
    return tuple(f for f in dataclasses.fields(VPSConfig) if "flag" in f.metadata)


def check_field_names(names: Any) -> None:
    """Raise `UnknownFieldError` for names that are not `VPSConfig` fields, suggesting the nearest one
    of each (``ranks`` -> ``rank``) and listing the fields when nothing is close."""
    unknown = sorted(set(names) - set(FIELD_NAMES))
    if not unknown:
        return
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(str(name), FIELD_NAMES, n=1)
        hints.append(f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name))
    message = f"unknown VPSConfig field{'s' if len(unknown) > 1 else ''} {', '.join(hints)}"
    if not all("did you mean" in h for h in hints):
        message += f"; known fields: {', '.join(FIELD_NAMES)}"
    raise UnknownFieldError(message)


def _checking_init(init: Any) -> Any:
    """The dataclass ``__init__``, preceded by the field-name check: Python's own error for an unknown
    keyword ("unexpected keyword argument 'ranks'") names no alternative."""

    @functools.wraps(init)
    def __init__(self: VPSConfig, *args: Any, **kwargs: Any) -> None:
        check_field_names(kwargs)
        init(self, *args, **kwargs)

    return __init__


# Wrapped after the class is built: a hand-written __init__ in the class body would replace the generated one.
VPSConfig.__init__ = _checking_init(VPSConfig.__init__)  # type: ignore[method-assign]


def as_config(cfg: VPSConfig | str | os.PathLike[str] | None = None, **overrides: Any) -> VPSConfig:
    """The `VPSConfig` that ``cfg`` names, with ``overrides`` applied by the override rules of
    `VPSConfig.from_overrides` (a larger ``rank`` widens topk unless ``topk`` is given).

    ``cfg`` is a `VPSConfig`, a path to a JSON file written by `VPSConfig.save` or to a directory
    written by `VPSConfig.save_pretrained`, or None for the seed defaults. This is what `vps.patch`
    and `vps.patched` accept: ``vps.patch(model, "best.json")``, ``vps.patch(model, rank=4)``.

    Raises:
        ConfigError: the file cannot be read, or a field is unknown (with the nearest name) or out of range.
        TypeError: ``cfg`` is none of the above.
    """
    if cfg is None:
        base = VPSConfig()
    elif isinstance(cfg, VPSConfig):
        base = cfg
    elif isinstance(cfg, (str, os.PathLike)):
        base = VPSConfig.load(cfg)
    else:
        raise TypeError(f"cfg must be a VPSConfig, a path to a VPSConfig JSON file (or to a directory holding "
                        f"{CONFIG_NAME}) or None, got {type(cfg).__name__}")
    return VPSConfig.from_overrides(overrides, base=base) if overrides else base


def _int_at_least(name: str, value: Any, lo: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise ConfigError(f"{name} must be an int >= {lo}, got {value!r}")


def _finite_at_least(name: str, value: Any, lo: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < lo:
        raise ConfigError(f"{name} must be a finite number >= {lo}, got {value!r}")


def _finite_in(name: str, value: Any, lo: float, hi: float) -> None:
    if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
            or not lo <= value <= hi):
        raise ConfigError(f"{name} must be a finite number in [{lo}, {hi}] (the seed's range), got {value!r}")


def _finite_positive(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")


def _ordered(name: str, lo: float, hi: float) -> None:
    if lo > hi:
        raise ConfigError(f"{name} must satisfy lo <= hi, got ({lo}, {hi})")


def _check_targets(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as exc:
            raise ConfigError(f"{name} is not a valid regular expression ({exc}): {value!r}") from None
        return
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{name} must be None, a regex string, or a non-empty list of names, got {value!r}")
