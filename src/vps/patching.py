"""Patching a HuggingFace model in place: `patch`, `unpatch`, `disabled` and friends.

Target rules follow PEFT: a string is a full-match regular expression over module names; a list
matches a module whose name equals an entry or ends with ``"." + entry``. ``exclude_modules`` uses
the same rules; ``layers`` keeps only modules inside the listed transformer blocks (the first
``.N.`` in the name).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from .config import VPSConfig, as_config
from .context import VPSContext
from .coupling import QKPair
from .kv_cache import forward_call_reader
from .layer import Conv1D, VPSLinear

_DECODER_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_TARGETS: dict[str, list[str]] = {
    **{t: _DECODER_TARGETS for t in ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text",
                                     "olmo", "olmo2", "granite", "smollm3")},
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}
_LAYER_INDEX = re.compile(r"\.(\d+)(?:\.|$)")


class PatchError(ValueError):
    """The model cannot be patched as asked (already patched, no matching targets, ...)."""


@dataclass
class PatchState:
    """Everything `patch` added to a model, so `unpatch` can take it away again."""

    cfg: VPSConfig
    ctx: VPSContext
    layers: dict[str, VPSLinear]
    pairs: list[QKPair] = field(default_factory=list)
    handles: list[Any] = field(default_factory=list)


def patch(model: nn.Module, cfg: VPSConfig | str | os.PathLike[str] | None = None, **overrides: Any) -> nn.Module:
    """Wrap the model's target linear layers with `VPSLinear`, in place; returns the model.

    ``cfg`` is a `VPSConfig`, a path to its JSON file (`VPSConfig.save`) or to a directory holding
    ``vps_config.json`` (`VPSConfig.save_pretrained`), or None for the seed defaults; keyword
    ``overrides`` change fields of it (``vps.patch(model, rank=4)``; a misspelled name is refused with
    the nearest field named).

    ``generate()`` keeps working; weights are never modified (the patched model's ``state_dict``
    keeps the original keys and values). Patching an already patched model raises `PatchError`.
    """
    cfg = as_config(cfg, **overrides)
    if is_patched(model):
        raise PatchError("model is already patched with VPS; call vps.unpatch(model) first")
    names = select_targets(model, cfg)
    ctx = VPSContext(cfg)
    layers: dict[str, VPSLinear] = {}
    try:
        for name in names:
            parent, attr = _parent_of(model, name)
            layer = VPSLinear(getattr(parent, attr), cfg, ctx, name=name)
            setattr(parent, attr, layer)
            layers[name] = layer
    except BaseException:
        # A layer this configuration cannot wrap (a rank beyond its size) must not leave the ones before it
        # wrapped: the model would be neither patched (no state) nor the original.
        for name, layer in layers.items():
            parent, attr = _parent_of(model, name)
            setattr(parent, attr, layer.base_layer)
        raise
    state = PatchState(cfg, ctx, layers)
    if cfg.qk_coupling:
        state.pairs = _couple_qk(model, layers)
    read = forward_call_reader(model)
    state.handles.append(model.register_forward_pre_hook(
        lambda _m, args, kwargs: ctx.begin(read(args, kwargs)), with_kwargs=True))
    state.handles.append(model.register_forward_hook(lambda _m, _a, output: ctx.end(output)))
    cast(Any, model)._vps_state = state  # a plain attribute (nn.Module's typed __setattr__ takes tensors/modules)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the original modules exactly (the very same objects) and remove every hook."""
    state = _state(model)
    for handle in state.handles:
        handle.remove()
    for pair in state.pairs:
        pair.detach()
    for name, layer in state.layers.items():
        parent, attr = _parent_of(model, name)
        setattr(parent, attr, layer.base_layer)
    del model._vps_state
    return model


@contextlib.contextmanager
def patched(model: nn.Module, cfg: VPSConfig | str | os.PathLike[str] | None = None,
            **overrides: Any) -> Iterator[nn.Module]:
    """``with vps.patched(model, cfg):`` - the model patched inside the block, restored exactly after it
    (also when the block raises). ``cfg`` and ``overrides`` are read as `patch` reads them."""
    patch(model, cfg, **overrides)
    try:
        yield model
    finally:
        # A body that unpatched the model itself (and maybe raised) keeps its own exception, not a PatchError.
        if is_patched(model):
            unpatch(model)


def is_patched(model: nn.Module) -> bool:
    """Whether `patch` has been applied (and not undone)."""
    return getattr(model, "_vps_state", None) is not None


def vps_layers(model: nn.Module) -> dict[str, VPSLinear]:
    """The patched layers by module name."""
    return dict(_state(model).layers)


def get_config(model: nn.Module) -> VPSConfig:
    """The config a model was patched with."""
    return _state(model).cfg


def get_context(model: nn.Module) -> VPSContext:
    """The forward context shared by a patched model's layers."""
    return _state(model).ctx


def disabled(model: nn.Module) -> contextlib.AbstractContextManager[nn.Module]:
    """Inside the block the model computes exactly its base outputs; VPS is back afterwards."""
    return _context_flag(model, "enabled", False)


def reuse_selection(model: nn.Module) -> contextlib.AbstractContextManager[nn.Module]:
    """Forwards inside the block keep each layer's stored selectors and decisions.

    A full recompute of prompt + generated tokens inside this block reproduces what frozen KV-cached
    decoding computed after the prompt's prefill.
    """
    return _context_flag(model, "reuse_selection", True)


def static_plans(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Keep every layer's plan at fixed addresses: each new plan is copied into tensors held per plan
    shape (one set per batch size), instead of replacing them.

    For CUDA graphs captured outside ``torch.compile`` (``torch.cuda.CUDAGraph``): a graph that
    captured a frozen decode step reads its plan from the addresses it saw at capture, so only with
    static plans does a replay after a new prompt's prefill use that prompt's plan. ``torch.compile``
    (its ``reduce-overhead`` mode included) needs none of this: plans are inputs of its graphs. Plans
    that carry autograd (refinement) are kept as built. Off (``enabled=False``) drops the held tensors.
    Returns the model.
    """
    for layer in _state(model).layers.values():
        layer.static_plans = enabled
        if not enabled:
            layer._plan_buffers.clear()
    return model


@contextlib.contextmanager
def _context_flag(model: nn.Module, name: str, value: bool) -> Iterator[nn.Module]:
    ctx = _state(model).ctx
    previous = getattr(ctx, name)
    setattr(ctx, name, value)
    try:
        yield model
    finally:
        setattr(ctx, name, previous)


def set_entropy_hint(model: nn.Module, entropy: torch.Tensor | float | None) -> None:
    """Hand a measured next-token entropy (per sequence, or one value) to the next prefill's policy."""
    if entropy is not None and not isinstance(entropy, torch.Tensor):
        entropy = torch.tensor([float(entropy)])
    _state(model).ctx.entropy_hint = entropy


def update_outcome(model: nn.Module, improved: bool | Sequence[bool],
                   loss_delta: float | Sequence[float] = 0.0) -> None:
    """Report a refinement outcome (or one per sequence of a batch refined together) to every layer's policy."""
    for layer in _state(model).layers.values():
        layer.policy.update_outcome(improved, loss_delta)


def reset_state(model: nn.Module) -> None:
    """Forget policies' histories, captured gradients, stored plans, gains and entropies."""
    state = _state(model)
    for layer in state.layers.values():
        layer.reset()
    state.ctx.entropy = state.ctx.entropy_hint = None


def clear_gradients(model: nn.Module) -> None:
    """Drop every captured output gradient."""
    for layer in _state(model).layers.values():
        layer.clear_gradient()


# -- target selection -------------------------------------------------------------------------------
def select_targets(model: nn.Module, cfg: VPSConfig) -> list[str]:
    """Names of the modules `patch` would wrap under ``cfg`` (errors name what did not match)."""
    targets = cfg.target_modules
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGETS:
            raise PatchError(f"no default target modules for model type {model_type!r}; pass target_modules "
                             f"(known defaults: {sorted(DEFAULT_TARGETS)})")
        targets = DEFAULT_TARGETS[model_type]
    chosen: list[str] = []
    hit: set[str] = set()
    blocks: set[int] = set()  # block indices of the modules the targets match
    for name, module in model.named_modules():
        matched = _matches(name, targets)
        if matched is None:
            continue
        found = _LAYER_INDEX.search(name)
        if found is not None:
            blocks.add(int(found.group(1)))
        if cfg.exclude_modules is not None and _matches(name, cfg.exclude_modules) is not None:
            hit.add(matched)
            continue
        if cfg.layers is not None:
            found = _LAYER_INDEX.search(name)
            if found is None or int(found.group(1)) not in cfg.layers:
                hit.add(matched)
                continue
        if not isinstance(module, nn.Linear) and not (Conv1D is not None and isinstance(module, Conv1D)):
            raise PatchError(f"target {matched!r} matched module {name!r} of type {type(module).__name__}; "
                             "VPS wraps nn.Linear and Conv1D layers only")
        hit.add(matched)
        chosen.append(name)
    if cfg.layers is not None and (absent := sorted(set(cfg.layers) - blocks)):
        have = f"blocks {min(blocks)}..{max(blocks)}" if blocks else "no numbered blocks"
        raise PatchError(f"layers {absent} are not in {type(model).__name__} (its target modules are in {have})")
    wanted = [targets] if isinstance(targets, str) else list(targets)
    missing = [t for t in wanted if t not in hit]
    if missing:
        raise PatchError(f"target_modules {missing} matched no module of {type(model).__name__}")
    if not chosen:
        raise PatchError(f"no module left to patch after exclude_modules={cfg.exclude_modules!r} and "
                         f"layers={cfg.layers!r}")
    return chosen


def _matches(name: str, targets: str | list[str]) -> str | None:
    if isinstance(targets, str):
        return targets if re.fullmatch(targets, name) else None
    for t in targets:
        if name == t or name.endswith("." + t):
            return t
    return None


def _couple_qk(model: nn.Module, layers: dict[str, VPSLinear]) -> list[QKPair]:
    config = cast(Any, model).config  # a HuggingFace PretrainedConfig (nn.Module types it Tensor | Module)
    text_cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    n_heads = getattr(text_cfg, "num_attention_heads", None)
    if n_heads is None:
        return []
    n_kv = getattr(text_cfg, "num_key_value_heads", None) or n_heads
    head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // n_heads
    pairs = []
    for name, layer in layers.items():
        if not name.endswith("q_proj"):
            continue
        k_layer = layers.get(name[: -len("q_proj")] + "k_proj")
        if k_layer is not None:
            pairs.append(QKPair(layer, k_layer, n_heads, n_kv, head_dim))
    return pairs


def _parent_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def _state(model: nn.Module) -> PatchState:
    state = getattr(model, "_vps_state", None)
    if state is None:
        raise PatchError("model is not patched with VPS; call vps.patch(model, cfg) first")
    return state
