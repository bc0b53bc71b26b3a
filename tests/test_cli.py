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


@pytest.mark.real_model
def test_generate_compare_on_default_model(capsys):
    assert main(["generate", "What is 17 * 23?", "--compare", "--max-new-tokens", "8"]) == 0
    captured = capsys.readouterr()
    assert "VPS off" in captured.out and "VPS on" in captured.out
    off, on = captured.out.split("--- VPS on ---")
    assert off.split("--- VPS off ---")[1].strip() and on.strip(), "both answers are non-empty"
    assert "210 layers" in captured.err


@pytest.mark.real_model
def test_refine_json_on_default_model(capsys):
    import json

    assert main(["refine", "What is 2 + 3?", "--iters", "2", "--k-samples", "0", "--max-new-tokens", "6",
                 "--json"]) == 0
    trace = json.loads(capsys.readouterr().out)
    assert len(trace["trace"]) == 2 and trace["oracle"] is False
