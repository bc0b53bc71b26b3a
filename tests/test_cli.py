"""The thin CLI: argument errors, `vps info`, and `vps generate` on the real default model."""

import pytest

from vps.cli import main


def test_info_lists_cache_and_aliases(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "model cache:" in out and "smollm2-135m" in out and "torch" in out


def test_bad_arguments_exit_with_a_named_error(capsys):
    assert main(["generate", "hi", "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "hi", "--builder", "magic"])


@pytest.mark.parametrize("argv, message", [
    (["generate", "hi", "--threads", "0"], "--threads must be in [1, 1024], got 0"),
    (["refine", "hi", "--threads", "0"], "--threads must be in [1, 1024], got 0"),
    (["refine", "hi", "--iters", "0"], "--iters: iters must be >= 1, got 0"),
    (["refine", "hi", "--k-samples", "-1"], "--k-samples: k_samples must be in [0, 64], got -1"),
    (["refine", "hi", "--max-new-tokens", "0"], "--max-new-tokens: max_new_tokens must be >= 1, got 0"),
    (["refine", "hi", "--gamma", "5"], "gamma must be a finite number in [0.0, 1.0]"),
    (["generate", "hi", "--device", "cuda"], "--device cuda: "),
    (["generate", "hi", "--device", "tpu:x"], "--device: 'tpu:x' is not a torch device"),
    (["generate", "hi", "--gamma", "2"], "gamma must be a finite number in [0.0, 1.0]"),
    (["generate", "hi", "--temperature", "nan"], "--temperature must be a number >= 0"),
    (["generate", "hi", "--compile", "fast"], "--compile: expected one of default, reduce-overhead"),
    (["bench", "--compile", "fast"], "--compile: expected one of default, reduce-overhead"),
    (["bench", "--compile", "--warmup", "0"], "--compile needs --warmup >= 1"),
    (["generate", "hi", "--device-map", "everywhere"], "--device-map: expected one of auto, balanced"),
    (["generate", "hi", "--device-map", "auto", "--device", "cpu"], "--device-map places the model itself"),
    (["generate", "hi", "--offload-folder", "/tmp/x"], "--offload-folder is only used with --device-map"),
    (["eval", "--device-map", "everywhere", "--out", "/tmp/vps-never-written"], "--device-map: expected one of"),
    (["refine", "hi", "--k-samples", "0"], "--k-samples 0 would skip self-consistency"),
    (["refine", "hi", "--k-samples", "65"], "--k-samples: k_samples must be in [0, 64], got 65"),
    (["refine", "hi", "--seed", "-1"], "--seed: seed must be a whole number in [0, 2**63 - 1], got -1"),
    (["refine", "hi", "--mode", "oracle", "--gold", ""], "--gold '': not an answer (answer_field is empty)"),
    (["refine", "hi", "--threads", "99999999999999999999"], "--threads must be in [1, 1024]"),
])
def test_user_errors_end_in_one_named_line_before_loading(argv, message, capsys, monkeypatch):
    import torch

    import vps.models

    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    monkeypatch.setattr(vps.models, "load_model", lambda *a, **k: pytest.fail("the model must not be loaded"))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"vps {argv[0]}: error: ") and message in err[0]


def test_version(capsys):
    from vps import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"vps {__version__}"


@pytest.mark.real_model
def test_generate_compare_on_default_model(capsys):
    assert main(["generate", "What is 17 * 23?", "--compare", "--max-new-tokens", "8"]) == 0
    captured = capsys.readouterr()
    assert "VPS off" in captured.out and "VPS on" in captured.out
    off, on = captured.out.split("--- VPS on ---")
    assert off.split("--- VPS off ---")[1].strip() and on.strip(), "both answers are non-empty"
    assert "210 layers" in captured.err
    # what a person needs to read the run: the answer found, the token limit, the policy in words
    assert captured.err.count("[answer: ") == 2 and "stopped at --max-new-tokens" in captured.err
    assert "hybrid uses sc only where a gradient was captured" in captured.err
    assert "(of at most 0.5)" in captured.err


@pytest.mark.real_model
def test_refine_json_on_default_model(capsys):
    import json

    assert main(["refine", "What is 2 + 3?", "--iters", "2", "--k-samples", "1", "--max-new-tokens", "6",
                 "--json"]) == 0
    trace = json.loads(capsys.readouterr().out)
    assert len(trace["trace"]) == 2 and trace["oracle"] is False


def test_help_imports_neither_torch_nor_transformers():
    """`vps --help` and every subcommand's parser stay light: heavy modules load when a command runs."""
    import subprocess
    import sys

    code = ("import sys, vps.cli; vps.cli.build_parser()\n"
            "import vps; vps.__all__\n"
            "heavy = ('torch', 'transformers', 'optuna', 'lm_eval', 'matplotlib')\n"
            "print(sorted(m for m in heavy if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_top_level_names_resolve_lazily_to_the_user_api():
    import vps

    for name in vps.__all__:
        assert getattr(vps, name) is not None, name
    assert callable(vps.refine) and callable(vps.trace) and callable(vps.tune)  # functions, not modules
    assert "set_entropy_hint" not in vps.__all__ and vps.set_entropy_hint is not None
    import pytest

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        vps.nope  # noqa: B018
