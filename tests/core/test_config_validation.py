"""Values that used to pass and then ruin a run: caught where the config is made or applied, named."""

from __future__ import annotations

import dataclasses

import pytest

import vps
from tests.helpers.tiny import tiny_llama
from vps.config import ConfigError
from vps.patching import PatchError


@pytest.mark.parametrize("name, kwargs, message", [
    ("gamma far above the seed range", {"gamma": 1e9}, r"gamma must be a finite number in \[0.0, 1.0\]"),
    ("negative gamma", {"gamma": -0.1}, "gamma must be"),
    ("gamma bound above the range", {"gamma_bounds": (0.0, 2.0)}, r"gamma_bounds\[1\]"),
    ("invalid target regex", {"target_modules": "(["}, "target_modules is not a valid regular expression"),
    ("invalid exclude regex", {"exclude_modules": "*proj"}, "exclude_modules is not a valid regular expression"),
])
def test_bad_values_are_refused_when_the_config_is_made(name, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        vps.VPSConfig(**kwargs)


def test_the_seed_range_itself_is_accepted():
    assert vps.VPSConfig(gamma=1.0, gamma_bounds=(0.0, 1.0)).gamma == 1.0
    assert vps.VPSConfig(gamma=0.0).gamma == 0.0


def test_a_config_cannot_be_changed_after_it_is_made():
    cfg = vps.VPSConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.rank = -5
    assert cfg.replace(rank=4).rank == 4 and cfg.rank == 2
    assert cfg == cfg.replace(version="0.0.0"), "the writing library's version is not part of equality"


@pytest.mark.parametrize("layers, message", [
    ([0, 999], r"layers \[999\] are not in LlamaForCausalLM \(its target modules are in blocks 0..1\)"),
    ([5, 2], r"layers \[2, 5\]"),
])
def test_layers_beyond_the_model_are_refused(layers, message):
    with pytest.raises(PatchError, match=message):
        vps.patch(tiny_llama(), vps.VPSConfig(topk=8, layers=layers))


@pytest.mark.parametrize("argv, message", [
    (["--gamma", "1e9"], "gamma must be a finite number in [0.0, 1.0]"),
    (["--gamma", "nan"], "gamma must be a finite number"),
])
def test_cli_names_a_bad_vps_value_before_loading(tmp_path, capsys, argv, message):
    from vps import cli

    rc = cli.main(["eval", "--model", str(tmp_path / "none"), "--data", "gsm8k:test", "--limit", "1",
                   "--out", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("prompt_chars, new_tokens, warns", [
    (100, 40, True),   # 100 + 40 > the tiny model's 128 positions
    (100, 28, False),  # exactly 128
    (10, 20, False),
])
def test_prompts_past_the_context_are_warned_about(prompt_chars, new_tokens, warns, recwarn):
    import warnings

    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.helpers.tiny_eval import tiny_tokenizer
    from vps.prompting import ContextLengthWarning, generate_texts

    tok = tiny_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg).eval()
    warnings.simplefilter("always", ContextLengthWarning)
    generate_texts(model, tok, ["a" * prompt_chars], max_new_tokens=new_tokens)
    found = [w for w in recwarn.list if issubclass(w.category, ContextLengthWarning)]
    assert bool(found) is warns
    if warns:
        assert "more than the model's context of 128" in str(found[0].message)


@pytest.mark.parametrize("keep", [0.5, 0.01])
def test_a_truncated_weights_file_is_one_named_error(tmp_path, capsys, keep):
    from tests.bench.test_bench import save_tiny_checkpoint
    from vps import cli

    ckpt = tmp_path / "tiny"
    save_tiny_checkpoint(ckpt)
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: max(1, int(len(data) * keep))])
    capsys.readouterr()  # what saving the checkpoint printed
    assert cli.main(["generate", "hi", "--model", str(ckpt), "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vps generate: error: ") and str(ckpt) in err[0]
    assert "damaged or truncated" in err[0]
