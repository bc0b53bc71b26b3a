"""The documents of the ``gsm8k_local`` task: GSM8K read from the local JSONL copy, never from a hub.

lm-eval calls `load_gsm8k` through the task file's ``custom_dataset`` with the run's metadata
(which lm-eval fills with the ``--model_args`` and ``--metadata`` values) and the task's
``dataset_kwargs``, so any of those may name other files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..evaluation.data import gsm8k_path, load_items

__all__ = ["FILE_KEYS", "gsm8k_records", "load_gsm8k"]

# split -> the metadata / dataset_kwargs key that points the split at another JSONL file
FILE_KEYS = {"train": "gsm8k_train", "test": "gsm8k_test"}


def gsm8k_records(path: str | Path) -> list[dict[str, Any]]:
    """The items of one GSM8K-style JSONL file as task documents, in file order.

    The lines are read by `vps.evaluation.data.load_items`, so a malformed line is skipped (with a
    warning) exactly as ``vps eval`` skips it and both evaluate the same items.
    """
    items = load_items(path).items
    return [{"question": it.question, "answer": it.answer, "id": it.id, "index": it.index} for it in items]


def load_gsm8k(**kwargs: Any) -> Any:
    """A ``datasets.DatasetDict`` with the ``train`` and ``test`` splits of the local GSM8K copy.

    Each split is the file named by ``gsm8k_train`` / ``gsm8k_test`` in ``kwargs`` (``--metadata
    gsm8k_test=PATH``), else `vps.evaluation.data.gsm8k_path` (``$VPS_DATA_DIR/gsm8k/<split>.jsonl``
    or the checked-in ``shared/data/gsm8k``). Other keyword arguments (lm-eval passes every model
    argument and metadata value) are ignored.

    Raises:
        FileNotFoundError: a split's file does not exist; the message names it and the key to set.
    """
    import datasets

    splits = {}
    for split, key in FILE_KEYS.items():
        given = kwargs.get(key)
        if given is not None:
            path = Path(str(given)).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"{key}={str(given)!r}: no such file (the {split} split of gsm8k_local)")
        else:
            path = gsm8k_path(split)
        splits[split] = datasets.Dataset.from_list(gsm8k_records(path))
    return datasets.DatasetDict(splits)
