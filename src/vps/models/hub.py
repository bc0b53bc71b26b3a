"""Loading a model by its HuggingFace hub id (``owner/name``), failing fast where the hub cannot be reached.

Without a quick look first, transformers retries a dead connection for about half a minute before it
fails; `load_from_hub` probes the hub (or the proxy) with a short timeout and, where it is
unreachable or offline mode is set, loads only from the local HuggingFace cache.
"""

from __future__ import annotations

import os
import re
import threading
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import torch

from .errors import ModelLoadError
from .pins import known_aliases
from .progress import quiet_transformers

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["HUB_ID", "load_from_hub"]

#: What a hub id looks like; a name that is neither an alias nor a path is tried on the hub only if it matches.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_HUB_PROBE_TIMEOUT_S = 3.0


def _hub_unreachable_reason() -> str | None:
    """Why the hub cannot be used right now, or None; bounded by a short timeout.

    Without this, transformers retries a dead connection for about half a minute before failing.
    """
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var} is set"
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    target = urlsplit(proxy or os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = target.hostname or "", target.port or (80 if target.scheme == "http" else 443)
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            import socket

            socket.create_connection((host, port), timeout=_HUB_PROBE_TIMEOUT_S).close()
            outcome.append(None)
        except OSError as err:
            outcome.append(f"cannot connect to {host}:{port}: {err}")

    # A thread, because name resolution ignores socket timeouts and can hang on its own.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(_HUB_PROBE_TIMEOUT_S + 0.5)
    return outcome[0] if outcome else f"no answer from {host}:{port} within {_HUB_PROBE_TIMEOUT_S:.0f} s"


def load_from_hub(repo_id: str, dtype: torch.dtype, placement: dict[str, Any] | None = None
                  ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model and tokenizer of the hub repo ``repo_id``: downloaded where the hub is reachable, else
    from the local HuggingFace cache, else a `ModelLoadError` saying why neither worked."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    offline_reason = _hub_unreachable_reason()
    try:
        with quiet_transformers():
            # Offline, a copy in the local HuggingFace cache is still usable.
            local_only = offline_reason is not None
            model = AutoModelForCausalLM.from_pretrained(repo_id, dtype=dtype, local_files_only=local_only,
                                                         **(placement or {}))
            tokenizer = AutoTokenizer.from_pretrained(repo_id, local_files_only=local_only)
    except (OSError, ValueError) as err:
        if offline_reason is not None:
            raise ModelLoadError(
                f"{repo_id!r} is not a local path or a known alias, and the HuggingFace hub is unreachable "
                f"({offline_reason}) and has no local copy of it. Known aliases: {known_aliases()}"
            ) from err
        raise ModelLoadError(f"could not load {repo_id!r} from the HuggingFace hub: {err}") from err
    return model, tokenizer
