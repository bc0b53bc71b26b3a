"""Lazy package exports (PEP 562), shared by the packages whose import must stay cheap.

`import vps` and the command line's ``--help`` must not pay for torch and transformers: a package
lists its public names and the submodule each comes from, and a name's module is imported on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, namespace: dict[str, Any], exports: Mapping[str, str]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package`` (whose globals are ``namespace``), loading
    each name of ``exports`` (name -> submodule) from its submodule on first access.

    A module is named relative to ``package`` (``"rundir"``) or in full where it lies elsewhere (``"vps._io"``:
    a name with a dot). ``__dir__`` lists the package's ``__all__``, which must be defined before this is called:
    the module's own globals (``annotations``, ``TYPE_CHECKING``, this function) and the internals that
    ``exports`` also serves are reachable but are not the API ``dir()`` and tab completion should offer.
    """
    if "__all__" not in namespace:
        raise RuntimeError(f"{package} must define __all__ before lazy_exports: its __dir__ lists it")

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module if "." in module else f"{package}.{module}"), name)
        namespace[name] = value  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted(namespace["__all__"])

    return __getattr__, __dir__
