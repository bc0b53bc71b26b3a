"""The one error every step of finding, fetching, converting and loading a model raises.

It has a module of its own because every other module of `vps.models` raises it, and callers catch it
as `vps.models.ModelLoadError` whichever step failed.
"""

from __future__ import annotations

__all__ = ["ModelLoadError"]


class ModelLoadError(RuntimeError):
    """A model could not be found, fetched, converted or loaded; the message says which and why."""
