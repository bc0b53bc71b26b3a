"""Ablation grids: named configurations written as overrides of `VPSConfig`.

A grid file (YAML or JSON) is either a mapping ``name -> overrides`` or a list of mappings that each
carry a ``name``. Besides `VPSConfig` fields an entry may set ``method`` (``vps`` by default, or any
method of the registry, `vps.evaluation.methods`: ``base``, ``refine-self``, ``refine-oracle``, ``maj``,
``vps-maj``) and, for the methods that take it (the majority votes), ``votes`` (k). An unpatched method's
entry (``base``, ``maj``) takes no VPS overrides: it is the unpatched model.
A patched entry may also name a `VPSConfig` file under ``config`` (as ``vps eval --config`` reads it,
e.g. the ``best.json`` of a `vps tune` study; a relative path is read from the grid file's folder):
its other keys then override that file instead of the defaults.
Overrides follow `VPSConfig.from_overrides`, as ``vps eval``'s flags do: ``{rank: 64}`` widens topk to 64
unless the entry sets topk. Every error names the file, the configuration and the offending key.

Some entries cannot differ from another for their method: outside refinement no gradient is captured
and no outcome is recorded, so the fields that act only through those (L-BFGS, the improvement
history, the gradient step) are inert, Hybrid runs SK, and SK reads none of SC's fields (top-k,
alpha). `equivalent_entries` finds them from the configurations themselves, so `vps ablate` can skip
an entry whose rows would repeat another's.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .. import strict_yaml
from ..config import ConfigError, VPSConfig
from .methods.registry import MethodSpec, find_method, method_names, vote_method_names

__all__ = ["Equivalence", "GridEntry", "GridError", "acting_config", "default_grid_path", "equivalent_entries",
           "load_grid", "parse_grid"]


class GridError(ConfigError):
    """A grid file cannot be read or one of its configurations is invalid."""


# A grid entry is a `MethodSpec` (vps.evaluation.methods), as --methods builds them.
GridEntry = MethodSpec


def default_grid_path() -> Path:
    """The seed's ablation grid shipped with the package (``vps/grids/seed.yaml``)."""
    return Path(str(resources.files("vps").joinpath("grids").joinpath("seed.yaml")))


def load_grid(path: str | Path | None = None, base: VPSConfig | None = None) -> list[MethodSpec]:
    """Read a grid file (None = the shipped seed grid); overrides apply on top of ``base``."""
    path = default_grid_path() if path is None else Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GridError(f"grid file {path} does not exist") from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else strict_yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise GridError(f"grid file {path} cannot be parsed: {exc}") from None
    return parse_grid(data, base=base, source=str(path), root=path.parent)


def parse_grid(data: Any, base: VPSConfig | None = None, source: str = "grid",
               root: Path | None = None) -> list[MethodSpec]:
    """Named configurations from parsed grid data (see the module docstring for the shape); an entry's
    relative ``config`` path is read from ``root`` (the working directory when None)."""
    base = base if base is not None else VPSConfig()
    entries: list[tuple[str, Any]] = []
    if isinstance(data, dict):
        entries = [(str(name), body) for name, body in data.items()]
    elif isinstance(data, list):
        for pos, body in enumerate(data):
            if not isinstance(body, dict) or not isinstance(body.get("name"), str) or not body["name"].strip():
                raise GridError(f"{source}: entry {pos} must be a mapping with a non-empty string 'name'")
            rest = {k: v for k, v in body.items() if k != "name"}
            entries.append((body["name"], rest))
    else:
        raise GridError(f"{source}: a grid must be a mapping of name -> overrides or a list of entries with "
                        f"'name', got {type(data).__name__}")
    if not entries:
        raise GridError(f"{source}: the grid has no configurations")

    specs: list[MethodSpec] = []
    seen: set[str] = set()
    for name, body in entries:
        where = f"{source}: configuration {name!r}"
        if name in seen:
            raise GridError(f"{where}: duplicate name")
        seen.add(name)
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise GridError(f"{where}: overrides must be a mapping, got {type(body).__name__}")
        overrides = dict(body)
        method = overrides.pop("method", "vps")
        family = find_method(method)
        if family is None:
            raise GridError(f"{where}: key 'method' must be one of {method_names()}, got {method!r}")
        votes = overrides.pop("votes", None)
        if (votes is None) != (not family.votes):
            raise GridError(f"{where}: key 'votes' (k >= 1) is required by methods {', '.join(vote_method_names())} "
                            f"and only by them (method {method!r}, votes {votes!r})")
        if not family.patched:
            if overrides:
                raise GridError(f"{where}: method {method!r} runs the unpatched model and takes no VPS overrides, "
                                f"got key(s) {sorted(overrides)}")
            try:
                specs.append(MethodSpec(name, method, votes=votes))
            except ValueError as exc:
                raise GridError(f"{where}: {exc}") from None
            continue
        entry_base = _config_file(overrides.pop("config"), root, where) if "config" in overrides else base
        known = set(VPSConfig.__dataclass_fields__)
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise GridError(f"{where}: unknown key(s) {unknown} (not VPSConfig fields, nor 'method' / 'votes' / "
                            f"'config')")
        try:  # the override rules of every entry point: a larger rank widens topk, as `vps eval --rank` does
            cfg = VPSConfig.from_overrides(overrides, base=entry_base, source=where)
        except ConfigError as exc:
            raise GridError(str(exc)) from None
        try:
            specs.append(MethodSpec(name, method, cfg, votes=votes))
        except ValueError as exc:
            raise GridError(f"{where}: {exc}") from None
    return specs


def _config_file(value: Any, root: Path | None, where: str) -> VPSConfig:
    """The `VPSConfig` an entry's ``config`` key names."""
    if not isinstance(value, str) or not value.strip():
        raise GridError(f"{where}: key 'config' must be the path of a VPSConfig file (JSON, as `vps tune` "
                        f"writes best.json), got {value!r}")
    path = Path(value)
    if not path.is_absolute() and root is not None:
        path = root / path
    try:
        return VPSConfig.load(path)
    except ConfigError as exc:
        raise GridError(f"{where}: key 'config': {exc}") from None


# Fields that act only inside the refinement loop, with why: outside it no gradient is captured (vps.layer fills
# gradients only in refinement's backward pass) and no outcome is fed to the policy (`update_outcome`).
_REFINEMENT_ONLY: dict[str, str] = {
    "lbfgs_enabled": "L-BFGS preconditions refinement's gain steps",
    "lbfgs_m": "L-BFGS preconditions refinement's gain steps",
    "lbfgs_scale": "it scales refinement's gain steps",
    "grad_eta": "it moves SC's target against a gradient, which only refinement captures",
    "history_size": "the improvement history holds refinement's outcomes",
    "history_step": "the improvement history holds refinement's outcomes",
}
# Fields read only by the SC builder (its ridge coupling on the top-k candidates). SK takes the R best features of a
# ranking whose order does not depend on how many candidates are ranked, so none of these changes its selectors.
_SC_ONLY: dict[str, str] = {
    "topk": "top-k sizes only SC's candidate pool",
    "topk_bounds": "top-k sizes only SC's candidate pool",
    "adaptive_topk": "top-k sizes only SC's candidate pool",
    "alpha": "alpha regularises only SC's ridge solve",
}


def _gradient_free(spec: MethodSpec) -> bool:
    """Whether ``spec``'s method runs without a captured gradient (every patched method but refinement)."""
    return spec.patched and not spec.refines


def acting_config(spec: MethodSpec) -> dict[str, Any] | None:
    """The fields of ``spec``'s configuration that can change its outputs, builder as the one that runs;
    None for an unpatched method.

    A refinement method captures gradients, so every field acts. Any other patched method has none:
    the refinement-only fields drop out, ``hybrid`` is written as ``sk`` (Hybrid builds SC exactly where a
    gradient was captured), and with SK the SC-only fields drop out too. ``version`` never acts.
    """
    if spec.config is None:
        return None
    fields = spec.config.to_dict()
    fields.pop("version", None)
    if not _gradient_free(spec):
        return fields
    for name in _REFINEMENT_ONLY:
        fields.pop(name, None)
    if fields["builder"] == "hybrid":
        fields["builder"] = "sk"
    if fields["builder"] == "sk":
        for name in _SC_ONLY:
            fields.pop(name, None)
    return fields


@dataclass(frozen=True)
class Equivalence:
    """A grid entry whose rows cannot differ from those of the earlier entry ``same_as`` (same method, same
    acting configuration); ``why`` says, field by field, why their configurations differ in name only."""

    same_as: str
    why: str


def _why_inert(spec: MethodSpec, other: MethodSpec) -> str:
    """Why the fields on which two equivalent entries' configurations differ do not act for ``spec``'s method."""
    mine = spec.config.to_dict() if spec.config is not None else {}
    theirs = other.config.to_dict() if other.config is not None else {}
    differing = [k for k in mine if k != "version" and mine[k] != theirs[k]]
    if not differing:
        return "the same configuration"
    reasons = []
    for name in differing:
        if name == "builder":
            reasons.append(f"builders {theirs[name]} and {mine[name]} both run SK without a gradient "
                           f"({spec.method} captures none)")
        elif name in _REFINEMENT_ONLY:
            reasons.append(f"{name} acts only in refinement ({_REFINEMENT_ONLY[name]})")
        else:
            reasons.append(f"{name} does not act under SK ({_SC_ONLY[name]})")
    return "; ".join(reasons)


def equivalent_entries(specs: Sequence[MethodSpec]) -> dict[str, Equivalence]:
    """The patched entries of ``specs`` whose outputs cannot differ from an earlier entry's, by name.

    Two entries are equivalent when they run the same method (and number of votes) and their
    `acting_config` is the same; the first of each such group in grid order is the one kept. Unpatched
    entries are never marked (the baseline always runs).
    """
    first: dict[str, MethodSpec] = {}
    out: dict[str, Equivalence] = {}
    for spec in specs:
        acting = acting_config(spec)
        if acting is None:
            continue
        key = json.dumps([spec.method, spec.votes, acting], sort_keys=True)
        if key in first:
            out[spec.name] = Equivalence(first[key].name, _why_inert(spec, first[key]))
        else:
            first[key] = spec
    return out
