"""dtype helpers and cached constants for the per-layer hot path."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch


def as_float32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, without a dispatched op when it already is.

    A dtype check in Python is free; a no-op ``.float()`` is still a dispatched op, paid per layer and
    forward.
    """
    return t if t.dtype == torch.float32 else t.float()


_F = TypeVar("_F", bound=Callable[..., torch.Tensor])


def cached_tensor(fn: _F) -> _F:
    """``functools.lru_cache`` (64 entries) for a function building a constant tensor, bypassed under ``torch.compile``.

    Eagerly, the cache saves an op per layer and forward. Dynamo cannot use the cache (it traces the
    wrapped function anyway) and warns about it at every call site, so while compiling the function
    itself is called: its tensor becomes part of the graph, built once per graph, not per forward.
    """
    cached = functools.lru_cache(maxsize=64)(fn)

    @functools.wraps(fn)
    def call(*args: Any) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return fn(*args)
        return cached(*args)

    call.cache_clear = cached.cache_clear  # type: ignore[attr-defined]
    call.cache_info = cached.cache_info  # type: ignore[attr-defined]
    return call  # type: ignore[return-value]


@cached_tensor
def constant(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``value`` as a 0-dim tensor, built once per (value, dtype, device) rather than per forward.

    A Python number where an op needs a tensor operand (``torch.where``'s other branch, ``fmax``, the
    dividend of a true division) costs one more dispatched op per layer, or changes the arithmetic.
    Never modify the result in place: it is shared.
    """
    return torch.tensor(value, dtype=dtype, device=device)
