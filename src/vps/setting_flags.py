"""Settings that declare their command-line flag where they are defined.

A field of a settings dataclass (`vps.evaluation.settings.RunSettings`, `vps.tuning.settings.TuneSettings`)
made by `flag_field` carries its flag, help, choices and bounds as dataclass metadata, so the command that
exposes it builds the flag from the field (`vps.commands.common.add_setting_argument`) and an error about
the field can name the flag: one declaration, instead of the flag, its default and its choices spelled again
in the command. `VPSConfig` does the same for its fields (`vps.config.cli_fields`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

__all__ = ["flag_field", "flag_fields", "flag_of"]


def flag_field(default: Any, flag: str, help: str, *, choices: Sequence[str] | None = None, low: int | None = None,
               repeatable: bool = False, metavar: str | None = None) -> Any:
    """A dataclass field set by ``flag``: its default, help, choices, lower bound ``low`` (checked by the
    settings themselves) and whether the flag repeats (each use adds a value; not given: the default)."""
    return dataclasses.field(default=default, metadata={
        "flag": flag, "declares_flag": True, "help": help, "choices": choices, "low": low, "repeatable": repeatable,
        "metavar": metavar})


def flag_fields(cls: type) -> tuple[dataclasses.Field[Any], ...]:
    """The fields of settings class ``cls`` made by `flag_field`, in field order."""
    return tuple(f for f in dataclasses.fields(cls) if f.metadata.get("declares_flag"))


def flag_of(cls: type, name: str) -> str | None:
    """The flag that sets field ``name`` of ``cls``: a `flag_field`'s, or the ``flag`` metadata of a field whose
    flag a shared argument group declares (None: no flag sets it)."""
    return next((f.metadata["flag"] for f in dataclasses.fields(cls) if f.name == name and "flag" in f.metadata),
                None)
