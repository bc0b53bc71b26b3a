"""Converting a GGUF file into a cache entry: dequantised once, saved as float32 safetensors, and checked.

Dequantising a GGUF with transformers takes tens of seconds, so each GGUF is converted once
(`convert_into_cache`) and later loads read the saved copy in well under a second. The copy is
published only when the model reloaded from it gives logits identical to the GGUF-loaded model's on a
probe text (recorded in the entry's marker), and a GGUF that transformers cannot read is reported as
damaged or not, from the gguf reader's own verdict.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .cache import CACHE_FORMAT, MARKER, publish
from .checkpoint import load_saved
from .errors import ModelLoadError
from .progress import quiet_transformers, step

if TYPE_CHECKING:
    from tqdm import tqdm
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["convert_into_cache"]

_PROBE_TEXT = "The quick brown fox jumps over the lazy dog. 17 * 23 ="


def convert_into_cache(
    gguf_path: Path, key: str, source: str, work: Path, bar: tqdm[Any], gguf_sha256: str | None = None
) -> Path:
    """Convert ``gguf_path`` in the scratch dir ``work`` and publish it as the entry ``key``; returns the entry.

    ``source`` (where the GGUF came from) and ``gguf_sha256`` (its verified digest, None where it is
    not pinned) are recorded in the marker; ``bar`` advances by the steps "convert" and "save".
    """
    with step(bar, "convert"):
        model, tokenizer = _load_gguf(gguf_path)
    with step(bar, "save"):
        saved = work / "checkpoint"
        model.save_pretrained(saved)
        tokenizer.save_pretrained(saved)
        _check_round_trip(model, tokenizer, saved, gguf_path)
        del model
        meta = {
            "format": CACHE_FORMAT,
            "source": source,
            "gguf_bytes": gguf_path.stat().st_size,
            "gguf_sha256": gguf_sha256,
            "created": time.time(),
            "logits_identical_to_gguf_on": _PROBE_TEXT,
        }
        # Written last: an entry without it is incomplete.
        (saved / MARKER).write_text(json.dumps(meta, indent=2))
        return publish(saved, key)


def _check_round_trip(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, saved: Path, gguf: Path) -> None:
    """Refuse to cache a copy whose logits differ from the GGUF-loaded model's."""
    reloaded, _ = load_saved(saved, torch.float32)
    ids = tokenizer(_PROBE_TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        if not torch.equal(model(ids).logits, reloaded(ids).logits):
            raise ModelLoadError(f"{gguf}: the safetensors copy saved in {saved} gives different logits")


def _load_gguf(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a GGUF file as a dense float32 model with nothing quantized left attached."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    _check_gguf_magic(path)
    try:
        with quiet_transformers():
            # dequantize=True: plain float weights even where a packed-GGUF matmul kernel exists,
            # since the point is to save a standard checkpoint.
            model = AutoModelForCausalLM.from_pretrained(
                str(path.parent),
                gguf_file=path.name,
                quantization_config=GgufConfig(dequantize=True),
                dtype=torch.float32,
            )
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as err:  # transformers and the gguf reader raise many unrelated types
        raise ModelLoadError(_describe_gguf_failure(path, err)) from err
    _detach_gguf_quantizer(model, path)
    return model, tokenizer


def _detach_gguf_quantizer(model: PreTrainedModel, path: Path) -> None:
    """Make the model saveable: `save_pretrained` refuses any model with a GGUF quantizer attached.

    With ``GgufConfig(dequantize=True)`` transformers 5.x detaches it itself; without it (or in
    versions that ignore the flag) `hf_quantizer` and `config.quantization_config` stay set although
    the weights are already dense, which is what `remove_quantization_config` undoes.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    if not all(p.is_floating_point() for p in model.parameters()):
        raise ModelLoadError(f"{path}: transformers kept packed GGUF weights, which cannot be saved")
    quantizer.remove_quantization_config(model)


def _check_gguf_magic(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(4)
    if head != b"GGUF":
        found = "the file is empty" if not head else f"it starts with {head!r}"
        raise ModelLoadError(f"{path}: not a GGUF file: {found}, expected the magic b'GGUF'")


def _describe_gguf_failure(path: Path, err: Exception) -> str:
    """Say whether the file itself is damaged, which the errors from transformers rarely make clear."""
    import gguf

    size = path.stat().st_size
    try:
        gguf.GGUFReader(path)
    except Exception as read_err:
        return (
            f"{path}: truncated or corrupt GGUF ({size} bytes): the gguf reader cannot parse it "
            f"({type(read_err).__name__}: {read_err})"
        )
    return f"{path}: transformers could not load this GGUF ({type(err).__name__}: {err})"
