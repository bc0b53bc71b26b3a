"""Reading a saved HuggingFace checkpoint directory: a cache entry, a local checkpoint, or a fresh copy.

Every load of a saved directory goes through `load_saved`, so that the errors transformers and
safetensors raise for a missing, unreadable or damaged checkpoint all become one `ModelLoadError`
that names the directory. The conversion reads its freshly saved copy back through it too.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import ModelLoadError
from .progress import quiet_transformers

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["load_saved"]


def load_saved(path: Path, dtype: torch.dtype, placement: dict[str, Any] | None = None
               ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model (in ``dtype``, placed by ``placement``: `from_pretrained`'s device_map arguments) and
    tokenizer saved in ``path``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with quiet_transformers(always=True):  # a cached load takes well under a second: no bar
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **(placement or {}))
            tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as err:
        raise ModelLoadError(f"{path}: transformers could not load this checkpoint: {err}") from err
    except Exception as err:  # safetensors raises its own SafetensorError (a truncated or damaged file)
        if type(err).__name__ != "SafetensorError":
            raise
        raise ModelLoadError(f"{path}: a weights file is damaged or truncated ({err}); restore or re-download "
                             "it (a cache entry can be deleted: it is rebuilt)") from err
    return model, tokenizer
