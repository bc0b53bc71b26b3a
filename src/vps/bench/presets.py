"""The named VPS configurations a benchmark compares, and config specs such as ``sk:rank=4:adaptive_rank=false``."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from ..config import VPSConfig

__all__ = ["DEFAULT_CONFIGS", "PLAN_REUSE_PRESETS", "PRESETS", "is_floor", "make_config", "parse_config_spec",
           "resolve_configs"]

# Named configurations: VPSConfig overrides on top of the seed defaults (rank 2, topk 32, ...).
PRESETS: dict[str, dict[str, Any]] = {
    "sk": {"builder": "sk"},
    "sc": {"builder": "sc"},
    "hybrid": {"builder": "hybrid"},
    "sk-dynamic": {"builder": "sk", "decode_mode": "dynamic"},
    "sc-dynamic": {"builder": "sc", "decode_mode": "dynamic"},
    "hybrid-dynamic": {"builder": "hybrid", "decode_mode": "dynamic"},
    "sk-fixed": {"builder": "sk", "adaptive_rank": False, "adaptive_gamma": False},
    "floor": {"builder": "sk"},  # plans reused from an untimed run: the rank-2 term alone
}
PLAN_REUSE_PRESETS = frozenset({"floor"})
DEFAULT_CONFIGS = ("sk", "sc", "hybrid", "sk-dynamic", "floor")


def parse_config_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"sk"`` or ``"sk:order=2:adaptive_rank=false"`` -> (name, VPSConfig overrides).

    The part before the first ``:`` names a preset (`PRESETS`); each ``key=value`` after it sets a
    VPSConfig field (values are read as JSON where they parse, else as strings).
    """
    name, *pairs = spec.strip().split(":")
    if name not in PRESETS:
        raise ValueError(f"unknown bench config {name!r}; known: {', '.join(PRESETS)} "
                         "(add overrides as name:field=value:...)")
    overrides = dict(PRESETS[name])
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"bad override {pair!r} in bench config {spec!r}; expected field=value")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        overrides[key] = value
    return spec.strip(), overrides


def is_floor(name: str) -> bool:
    """Whether a config name (a spec as given) is a plan-reuse floor preset."""
    return name.split(":")[0].strip() in PLAN_REUSE_PRESETS


def make_config(overrides: dict[str, Any], source: str | None = None) -> VPSConfig:
    """Seed defaults plus ``overrides`` by `VPSConfig.from_overrides` (a larger rank widens topk to match),
    validated; a `ConfigError` starts with ``source`` (the spec) when given."""
    return VPSConfig.from_overrides(overrides, source=source)


def resolve_configs(specs: str | Iterable[str] | None) -> dict[str, dict[str, Any]]:
    """Config specs (a comma-separated string or a list) -> {name: overrides}; validates each config."""
    if specs is None:
        specs = DEFAULT_CONFIGS
    if isinstance(specs, str):
        specs = [s for s in specs.split(",") if s.strip()]
    out: dict[str, dict[str, Any]] = {}
    for spec in specs:
        name, overrides = parse_config_spec(spec)
        # Raise now, naming the spec and the bad field, rather than halfway through a run.
        make_config(overrides, f"bench config {name!r}")
        out[name] = overrides
    if not out:
        raise ValueError("no bench config given")
    return out
