"""The search space of `vps tune`: a small YAML file of parameters, validated before anything runs.

Each top-level key names a `VPSConfig` field or one of the two placement keys: ``modules``
(``all``, ``attention``, ``mlp``: which linear layers of a block are patched) and ``blocks``
(``all``, ``early``, ``middle``, ``late``: which third of the transformer blocks). A value is

- a list: a categorical choice among its entries;
- a mapping ``{low, high}`` with optional ``log`` (bool) and ``step``: a range, of ints when both
  bounds are ints and the field is an int field, else of floats;
- anything else: the field is fixed to that value in every trial.

A negative ``gamma`` damps instead of sharpening and lies outside the seed's ``[0, 1]``: a range or
choice below zero is accepted only when the file sets ``allow_damping: true``, and every trial and
config that uses it is labelled. Every error names the file and the key.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .. import strict_yaml
from ..config import GAMMA_MAX, ConfigError, VPSConfig

__all__ = ["BLOCKS", "MODULES", "Param", "SearchSpace", "SpaceError", "default_space_path", "load_space",
           "parse_space"]

MODULES = ("all", "attention", "mlp")
BLOCKS = ("all", "early", "middle", "late")
PLACEMENT_KEYS = ("modules", "blocks")
# Fields a trial may set. Targeting fields are left out (``modules`` / ``blocks`` say where to patch, for any
# architecture), and so are those that only act in refinement (L-BFGS, gradients), which the NLL objective
# never runs.
_TUNABLE = ("rank", "topk", "gamma", "tau", "builder", "order", "qk_coupling", "adaptive_rank", "adaptive_gamma",
            "adaptive_topk", "adaptive_order", "alpha", "scope", "decode_mode", "use_entropy", "history_size",
            "history_step")
_INT_FIELDS = {f.name for f in dataclasses.fields(VPSConfig) if f.type in ("int", int)}
_CATEGORY_TYPES = (bool, int, float, str)


class SpaceError(ConfigError):
    """A search-space file cannot be read, or one of its keys is invalid."""


@dataclass(frozen=True)
class Param:
    """One searched parameter: a categorical ``choices`` list or a ``low``..``high`` range."""

    name: str
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    integer: bool = False

    def suggest(self, trial: Any) -> Any:
        """The value an Optuna trial proposes for this parameter."""
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        assert self.low is not None and self.high is not None  # a parameter without choices is a range
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), step=self.step, log=self.log)

    def describe(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(str(c) for c in self.choices)
        kind = "int" if self.integer else "float"
        extra = (", log" if self.log else "") + (f", step {self.step}" if self.step else "")
        return f"{kind} in [{self.low}, {self.high}]{extra}"


@dataclass(frozen=True)
class SearchSpace:
    """The parsed space: searched parameters, fixed values, and whether gamma may go below zero."""

    params: tuple[Param, ...]
    fixed: dict[str, Any]
    allow_damping: bool = False
    source: str = "space"

    def suggest(self, trial: Any) -> dict[str, Any]:
        """Every parameter's value for ``trial`` (fixed values included)."""
        values = {p.name: p.suggest(trial) for p in self.params}
        return {**self.fixed, **values}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description (stored with the study, compared on resume)."""
        params = {p.name: ({"choices": list(p.choices)} if p.choices is not None else
                           {"low": p.low, "high": p.high, "log": p.log, "step": p.step, "int": p.integer})
                  for p in self.params}
        return {"params": params, "fixed": dict(self.fixed), "allow_damping": self.allow_damping}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "space") -> SearchSpace:
        """The inverse of `to_dict` (as stored in a study's ``tune.json``)."""
        params = []
        for name, spec in data["params"].items():
            if "choices" in spec:
                params.append(Param(name, choices=tuple(spec["choices"])))
            else:
                params.append(Param(name, low=spec["low"], high=spec["high"], log=spec["log"], step=spec["step"],
                                    integer=spec["int"]))
        return cls(tuple(params), dict(data["fixed"]), bool(data["allow_damping"]), source)

    @property
    def placement(self) -> dict[str, tuple[Any, ...]]:
        """The values ``modules`` and ``blocks`` can take in this space."""
        out: dict[str, tuple[Any, ...]] = {}
        for key in PLACEMENT_KEYS:
            param = next((p for p in self.params if p.name == key), None)
            if param is None:
                out[key] = (self.fixed.get(key, "all"),)
            else:
                assert param.choices is not None  # placement keys take no range (see _range)
                out[key] = param.choices
        return out


def default_space_path() -> Path:
    """The search space shipped with the package (``vps/grids/tune_space.yaml``)."""
    return Path(str(resources.files("vps").joinpath("grids").joinpath("tune_space.yaml")))


def load_space(path: str | Path | None = None) -> SearchSpace:
    """Read and validate a search-space YAML file (None: the bundled default)."""
    path = default_space_path() if path is None else Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpaceError(f"search space file {path} does not exist") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise SpaceError(f"search space file {path} cannot be read ({exc})") from None
    try:
        data = strict_yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpaceError(f"search space file {path} is not valid YAML: {exc}") from None
    return parse_space(data, source=str(path))


def parse_space(data: Any, source: str = "space") -> SearchSpace:
    """A `SearchSpace` from parsed YAML (see the module docstring for the shape)."""
    if not isinstance(data, dict) or not data:
        raise SpaceError(f"{source}: a search space must be a non-empty mapping of parameter -> values, "
                         f"got {type(data).__name__ if data is not None else 'nothing'}")
    data = dict(data)
    damping = data.pop("allow_damping", False)
    if not isinstance(damping, bool):
        raise SpaceError(f"{source}: key 'allow_damping' must be true or false, got {damping!r}")
    known = (*_TUNABLE, *PLACEMENT_KEYS)
    params: list[Param] = []
    fixed: dict[str, Any] = {}
    for key, value in data.items():
        where = f"{source}: key {key!r}"
        if key not in known:
            raise SpaceError(f"{where} is not a tunable parameter; known: {', '.join(known)}, allow_damping")
        if isinstance(value, list):
            params.append(_choices(key, value, where))
        elif isinstance(value, dict):
            params.append(_range(key, value, where))
        else:
            _check_value(key, value, where)
            fixed[key] = value
    space = SearchSpace(tuple(params), fixed, damping, source)
    _check_damping(space)
    if not space.params:
        raise SpaceError(f"{source}: nothing to search: every key is fixed (give a list or a low/high range)")
    return space


def _choices(key: str, values: list[Any], where: str) -> Param:
    if not values:
        raise SpaceError(f"{where}: an empty list of choices")
    for value in values:
        if not isinstance(value, _CATEGORY_TYPES):
            raise SpaceError(f"{where}: choice {value!r} must be a number, text or true/false")
        _check_value(key, value, where)
    if len(set(map(repr, values))) != len(values):
        raise SpaceError(f"{where}: a choice is listed twice in {values}")
    return Param(key, choices=tuple(values))


def _range(key: str, spec: dict[str, Any], where: str) -> Param:
    if key in PLACEMENT_KEYS:
        raise SpaceError(f"{where}: takes a list of choices from {MODULES if key == 'modules' else BLOCKS}, "
                         f"not a range")
    unknown = sorted(set(spec) - {"low", "high", "log", "step"})
    if unknown or "low" not in spec or "high" not in spec:
        raise SpaceError(f"{where}: a range is {{low, high}} with optional log and step, got keys {sorted(spec)}")
    low, high, log, step = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
    for name, value in (("low", low), ("high", high)) + ((("step", step),) if step is not None else ()):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise SpaceError(f"{where}: {name} must be a finite number, got {value!r}")
    if not isinstance(log, bool):
        raise SpaceError(f"{where}: log must be true or false, got {log!r}")
    if low > high:
        raise SpaceError(f"{where}: low {low} is above high {high}")
    if log and low <= 0:
        raise SpaceError(f"{where}: a log range needs low > 0, got {low}")
    if log and step is not None:
        raise SpaceError(f"{where}: a range cannot be both log and stepped")
    if step is not None and step <= 0:
        raise SpaceError(f"{where}: step must be > 0, got {step}")
    integer = key in _INT_FIELDS
    if integer and not all(isinstance(v, int) for v in (low, high, step or 1)):
        raise SpaceError(f"{where}: {key} is an integer, so low, high and step must be integers")
    if not integer and _field_type(key) not in ("float", float):
        raise SpaceError(f"{where}: {key} is not numeric; give a list of choices")
    for value in (low, high):
        _check_value(key, value, where)
    return Param(key, low=low, high=high, log=log, step=step, integer=integer)


def _field_type(key: str) -> Any:
    return next(f.type for f in dataclasses.fields(VPSConfig) if f.name == key)


def _check_value(key: str, value: Any, where: str) -> None:
    """Refuse a value the config (or the placement) would refuse, naming the key."""
    if key == "modules" and value not in MODULES:
        raise SpaceError(f"{where}: {value!r} is not one of {MODULES}")
    if key == "blocks" and value not in BLOCKS:
        raise SpaceError(f"{where}: {value!r} is not one of {BLOCKS}")
    if key in PLACEMENT_KEYS:
        return
    # As a trial would run it (`trial_config`): a rank widens topk, a negative gamma is checked as a damping
    # magnitude (whether the file allows damping is checked on the whole space, `_check_damping`).
    try:
        VPSConfig.from_overrides({key: value}, source=where, allow_damping=True)
    except ConfigError as exc:
        raise SpaceError(str(exc)) from None


def _check_damping(space: SearchSpace) -> None:
    """A gamma below zero only when the file allows damping; never beyond -GAMMA_MAX."""
    lows: list[float] = []
    for p in space.params:
        if p.name == "gamma" and p.choices is not None:
            lows.extend(c for c in p.choices if isinstance(c, (int, float)))
        elif p.name == "gamma":
            assert p.low is not None  # a parameter without choices is a range
            lows.append(p.low)
    if isinstance(space.fixed.get("gamma"), (int, float)):
        lows.append(space.fixed["gamma"])
    negative = [v for v in lows if v < 0]
    if negative and not space.allow_damping:
        raise SpaceError(f"{space.source}: key 'gamma' goes below 0 ({min(negative)}): that damps instead of "
                         f"sharpening, outside the seed's [0, {GAMMA_MAX}]; set 'allow_damping: true' to search it")
    if any(v < -GAMMA_MAX for v in negative):
        raise SpaceError(f"{space.source}: key 'gamma' must stay >= -{GAMMA_MAX}, got {min(negative)}")
