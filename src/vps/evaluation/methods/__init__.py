"""Evaluation methods, one module per family, each registering its names in `vps.evaluation.methods.registry`.

- ``generation``: ``base`` and ``vps`` (one decoding, and the gold solution's NLL); ``vps`` rows add
  ``fallbacks``.
- ``refine``: ``refine-self`` and ``refine-oracle`` (the refinement loop); rows add ``refine``, its trace.
- ``vote``: ``maj@K`` and ``vps-maj@K`` (a majority vote over K samples); rows add ``vote``.

To add a method, write a module that builds a `Method` (its runner and traits) and calls `register`, and name
it in `BUILTIN_MODULES` (or import it before the run): the harness, ``vps eval --methods``, grid files, run
directories and the report read the registry.
"""

from __future__ import annotations

import importlib
from typing import Any

from .registry import (
    BatchRunner,
    Method,
    MethodSpec,
    RunContext,
    find_method,
    get_method,
    method_names,
    register,
    registered,
    unregister,
    vote_method_names,
)

# The built-in method modules, imported for their registration. The order is the registry's, hence the order
# --methods lists them and messages name them in: a tuple, not import statements an import sorter reorders.
BUILTIN_MODULES = ("generation", "refine", "vote")
for _module in BUILTIN_MODULES:
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["BUILTIN_MODULES", "METHODS", "BatchRunner", "Method", "MethodSpec", "RunContext", "find_method",
           "get_method", "method_names", "register", "registered", "unregister", "vote_method_names"]


def __getattr__(name: str) -> Any:
    # METHODS, the registered names, read when asked for, so a method registered later is in it.
    if name == "METHODS":
        return method_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
