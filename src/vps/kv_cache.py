"""Finding a forward call's KV cache, attention mask and input length, whatever transformers calls them.

transformers 5.24 renamed the model forward's ``past_key_values`` argument to ``cache`` (and the
output field with it); ``generate()`` passes the new name. Code that reads arguments by name then
takes every decode step for a prefill, silently. So the cache is found by what it is (a
``transformers.Cache``, anything with ``get_seq_length``, or a legacy tuple of per-layer key/value
tensors), wherever it sits among the arguments; only our own calls into a model need its name, and
`cache_argument` reads that from the installed model's signature.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

_CACHE_NAMES = ("cache", "past_key_values")


def is_cache(value: Any) -> bool:
    """Whether ``value`` is a KV cache: a `transformers.Cache`-like object or a legacy tuple cache."""
    if value is None or isinstance(value, torch.Tensor):
        return False
    if callable(getattr(value, "get_seq_length", None)):
        return True
    return _is_legacy_cache(value)


def _is_legacy_cache(value: Any) -> bool:
    # ((key, value), ...) per layer, each (batch, heads, tokens, head_dim)
    if not isinstance(value, (tuple, list)) or not value:
        return False
    first = value[0]
    return (isinstance(first, (tuple, list)) and len(first) >= 2 and isinstance(first[0], torch.Tensor)
            and first[0].dim() == 4)


def cache_length(cache: Any) -> int:
    """Tokens already held by ``cache`` (0 for None or an empty cache)."""
    if cache is None:
        return 0
    get_len = getattr(cache, "get_seq_length", None)
    if callable(get_len):
        return int(get_len())
    if _is_legacy_cache(cache):
        return int(cache[0][0].shape[-2])
    return 0


def find_cache(values: Iterable[Any]) -> Any:
    """The first KV cache among ``values``, or None."""
    for value in values:
        if is_cache(value):
            return value
    return None


def output_cache(output: Any) -> Any:
    """The KV cache a model forward returned (None when it returned none), read by type, not by field name."""
    if isinstance(output, dict):  # ModelOutput is an OrderedDict of the fields that are set
        return find_cache(output.values())
    if isinstance(output, tuple):
        return find_cache(output)
    return None


def cache_argument(model: torch.nn.Module) -> str:
    """The keyword under which ``model.forward`` takes its KV cache in the installed transformers."""
    params = _parameters(model)
    for name in _CACHE_NAMES:
        if name in params:
            return name
    raise TypeError(f"{type(model).__name__}.forward takes no KV cache argument (looked for {_CACHE_NAMES})")


def forward_accepts(model: torch.nn.Module, name: str) -> bool:
    """Whether ``model.forward`` takes a parameter called ``name`` (e.g. ``logits_to_keep``)."""
    return name in _parameters(model)


def logits_to_keep_kwargs(model: torch.nn.Module, keep: int) -> dict[str, int]:
    """Forward arguments computing only the last ``keep`` positions' logits, where ``model`` can
    (``{"logits_to_keep": keep}``); empty where it cannot, and then every position is computed."""
    return {"logits_to_keep": keep} if forward_accepts(model, "logits_to_keep") else {}


def _parameters(model: torch.nn.Module) -> list[str]:
    try:
        return list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return []


@dataclass(frozen=True)
class ForwardCall:
    """What a patched model's hooks need from one forward call."""

    attention_mask: Any
    cache: Any
    tokens: int | None  # length of the new input (input_ids or inputs_embeds), when it could be found


def forward_call_reader(model: torch.nn.Module) -> Callable[[tuple[Any, ...], dict[str, Any]], ForwardCall]:
    """A function reading a `ForwardCall` from ``model``'s forward (args, kwargs).

    The cache is found by type among all arguments; the mask and the input by name, or by their
    position in the forward's signature when passed positionally.
    """
    params = _parameters(model)

    def named(args: tuple[Any, ...], kwargs: dict[str, Any], name: str) -> Any:
        if name in kwargs:
            return kwargs[name]
        if name in params and params.index(name) < len(args):
            return args[params.index(name)]
        return None

    def read(args: tuple[Any, ...], kwargs: dict[str, Any]) -> ForwardCall:
        tokens = None
        for name in ("input_ids", "inputs_embeds"):
            value = named(args, kwargs, name)
            if isinstance(value, torch.Tensor) and value.dim() >= 2:
                tokens = int(value.shape[1])
                break
        cache = find_cache(list(kwargs.values()) + list(args))
        return ForwardCall(named(args, kwargs, "attention_mask"), cache, tokens)

    return read
