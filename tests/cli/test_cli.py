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
    (["generate", "hi", "--no-vps", "--gamma", "5"], "gamma must be a finite number in [0.0, 1.0]"),
    (["generate", "hi", "--no-vps", "--gamma", "0.3"], "--no-vps generates with the unpatched model, so --gamma would"),
    (["bench", "--out", "/tmp"], "--out /tmp is a directory; name a file in it"),
    (["bench", "--out", "/etc/hostname/x.json"], "--out /etc/hostname/x.json: /etc/hostname is a file, not a"),
    (["bench", "--plot", "/etc/hostname/x.png"], "--plot /etc/hostname/x.png: /etc/hostname is a file"),
    (["bench", "--threads", "0"], "--threads must be in [1, 1024], got 0"),
    (["refine", "hi", "--k-samples", "0"], "--k-samples 0 would skip self-consistency"),
    (["refine", "hi", "--k-samples", "65"], "--k-samples: k_samples must be in [0, 64], got 65"),
    (["refine", "hi", "--seed", "-1"], "--seed: seed must be a whole number in [0, 2**63 - 1], got -1"),
    (["refine", "hi", "--mode", "oracle", "--gold", ""], "--gold '': not an answer (answer_field is empty)"),
    (["refine", "hi", "--threads", "99999999999999999999"], "--threads must be in [1, 1024]"),
    (["refine", "hi", "--stop", "\nQ:", "--stop", ""], "--stop: stop strings must be non-empty text, got ''"),
    (["generate", "hi", "--stop", ""], "--stop: stop strings must be non-empty text, got ''"),
    (["eval", "--methods", "base,maj@4", "--checkpoint-activations", "--out", "/tmp/vps-never-written"],
     "--checkpoint-activations applies to the refine methods' steps (refine-self, refine-oracle), and this run has "
     "none"),
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


# -- vps refine: the table, its legend and the flags' help ------------------------------------------------------
def _trace_row(it, answer, total=0.25):
    return {"iter": it, "answer": answer, "entropy": 1.5, "mean_gain": 1.0 + it * 1e-3, "seconds": 0.4,
            "loss": {"total": total, "components": {"numeric": 0.0, "units": None, "self_consistency": 0.5,
                                                    "algebraic": None}},
            "policy": {"sigma": 0.7, "gamma": 0.3, "rank": 1.5, "builders": {"sk": 2, "sc": 12 if it else 0}}}


def test_refine_table_keeps_whole_answers_and_the_legend_names_every_column():
    from vps.commands.refine import LEGEND, format_table

    long = "3 apples and 4 oranges\nin total"
    table = format_table([_trace_row(0, "7"), _trace_row(1, long), _trace_row(2, None, float("nan"))])
    head, _, first, second, third = table.splitlines()
    assert head.split() == ["it", "total", "numeric", "units", "self_c", "alg", "sigma", "gamma", "rank", "sc",
                            "gain-1", "H", "sec", "answer"]
    assert first.endswith("  7") and second.endswith("  3 apples and 4 oranges in total")  # whole, one line
    assert third.split()[1] == "-" and third.endswith("  -")  # no evidence and no answer both read "-"
    legend_names = {line.split()[0] for line in LEGEND.splitlines()[1:] if line.startswith("  ") and line[2] != " "}
    assert set(head.split()) - {"it"} <= legend_names, "every column but it (on the legend's first line) is explained"
    assert "it 0 is the plain greedy answer" in LEGEND and "weights numeric 1, units 0.5" in LEGEND


def test_refine_target_line_never_calls_the_majority_the_gold():
    from vps.commands.refine import target_line

    assert target_line(False, "7", ["7", "7", "8", None]) == (
        "mode: self (gold-free); target answer: 7 (the samples' majority answer, not the gold); "
        "samples: ['7', '7', '8', None]")
    assert "target answer: none: no two samples agree" in target_line(False, None, ["1", "2"])
    assert target_line(True, "7", []).startswith("mode: ORACLE (uses the gold answer it is scored on); "
                                                 "target answer: 7 (the gold)")


def test_refine_help_explains_the_flags_with_defaults_and_prints_the_legend(capsys):
    with pytest.raises(SystemExit):
        main(["refine", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for text in ("--iters ITERS decodes in all", "(default: 3)", "--k-samples K_SAMPLES sampled answers",
                 "(default: 4)", "--max-new-tokens MAX_NEW_TOKENS token limit", "(default: 256)",
                 "--seed SEED seed of the samples' randomness", "(default: 0)", "gain-1 mean per-layer gain minus 1"):
        assert text in out, text


def test_refine_prints_target_table_and_legend(capsys, monkeypatch):
    import vps.commands.refine as refine_command
    from tests.helpers.tiny_eval import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    monkeypatch.setattr(refine_command, "load", lambda args: (tiny_model(tok), tok))
    assert main(["refine", "What is 3 + 4?", "--iters", "2", "--k-samples", "2", "--max-new-tokens", "4",
                 "--topk", "8", "--threads", "1"]) == 0
    captured = capsys.readouterr()
    out = captured.out.splitlines()
    # the phases go to stderr as they start, so a long run shows where it is
    phases = ["[sampling 2 per prompt]", "[iteration 1/2: decode]", "[iteration 2/2: refinement step]",
              "[iteration 2/2: decode]"]
    assert [line for line in captured.err.splitlines() if line in phases] == phases
    assert out[0].startswith("mode: self (gold-free); target answer: ")
    assert out[1].split()[:2] == ["it", "total"] and out[3].startswith(" 0 ") and out[4].startswith(" 1 ")
    assert out[5].startswith("columns: one row per iteration") and out[-1].startswith("best: iteration ")


# -- vps info, vps eval --help, dir(vps) ------------------------------------------------------------------------
def test_info_says_where_gsm8k_is_read_from(capsys, monkeypatch, tmp_path):
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text("")
    monkeypatch.setenv("VPS_DATA_DIR", str(tmp_path))
    assert main(["info"]) == 0
    out = capsys.readouterr().out.splitlines()
    at = out.index(f"data (gsm8k:<split>): $VPS_DATA_DIR={tmp_path}")
    assert out[at + 1] == f"  test: {tmp_path / 'gsm8k' / 'test.jsonl'}"
    assert out[at + 2].startswith("  train: not found (VPS_DATA_DIR=") and "train.jsonl does not exist" in out[at + 2]
    monkeypatch.delenv("VPS_DATA_DIR")
    from vps.commands.info import data_lines
    from vps.evaluation.data import gsm8k_path

    lines = data_lines()
    assert lines[0].startswith("data (gsm8k:<split>): VPS_DATA_DIR not set: the first shared/data/gsm8k above")
    try:
        found = gsm8k_path("test")
    except FileNotFoundError:  # a checkout with no shared data above it (a clone elsewhere)
        assert lines[1].startswith("  test: not found")
    else:
        assert lines[1] == f"  test: {found}"  # the shared copy, as vps eval resolves it


def test_eval_help_spells_the_majority_votes_with_their_k(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "maj@K, vps-maj@K (default base,vps); K is the number of sampled completions" in out


def test_dir_lists_the_public_api_only():
    import vps
    import vps.bench
    import vps.evaluation
    import vps.refinement

    assert dir(vps) == sorted(vps.__all__)
    for package in (vps, vps.bench, vps.evaluation, vps.refinement):
        names = set(dir(package))
        assert not names & {"TYPE_CHECKING", "annotations", "lazy_exports", "importlib"}, package.__name__
        assert names == set(package.__all__), package.__name__
    assert "set_entropy_hint" not in dir(vps) and callable(vps.set_entropy_hint)  # an internal, still reachable


@pytest.mark.real_model
def test_generate_refuses_a_request_beyond_the_context(capsys):
    assert main(["generate", "What is 2 + 3?", "--no-vps", "--max-new-tokens", "100000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("vps generate: error: the prompt is ")
    assert "beyond the model's context of 8,192" in err[-1]


def test_generate_and_refine_stop_at_the_stop_strings_given(capsys, monkeypatch):
    """``--stop`` ends a ``vps generate`` answer and every decode and sample of ``vps refine`` where the stop
    string first appears: fewer tokens, and no refined text holds it."""
    import json

    import vps.commands.generate as generate_command
    import vps.commands.refine as refine_command
    from tests.helpers.tiny_eval import stop_inside, tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    for command in (generate_command, refine_command):  # each run patches a model of its own, as a user's does
        monkeypatch.setattr(command, "load", lambda args: (tiny_model(tok), tok))

    def generated(*extra: str) -> tuple[str, int]:
        assert main(["generate", "What is 3 + 4?", "--no-vps", "--max-new-tokens", "12", *extra]) == 0
        captured = capsys.readouterr()
        return captured.out.split("--- VPS off ---")[1], int(captured.err.split(" tokens in ")[0].split()[-1])

    text, tokens = generated()
    stop = stop_inside([text.strip()])
    assert generated("--stop", stop)[1] < tokens

    def refined(*extra: str) -> dict:
        assert main(["refine", "What is 3 + 4?", "--iters", "2", "--k-samples", "2", "--max-new-tokens", "12",
                     "--topk", "8", "--json", *extra]) == 0
        return json.loads(capsys.readouterr().out)

    def texts(result: dict) -> list[str]:
        return [row["text"] for row in result["trace"]] + list(result["sample_record"]["texts"])

    free = refined()
    stop = stop_inside(texts(free))
    stopped = refined("--stop", stop)
    assert not any(stop in t for t in texts(stopped)) and stopped["tokens"] < free["tokens"]
