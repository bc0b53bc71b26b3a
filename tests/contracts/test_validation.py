"""Every argument and every item is checked before anything is written or any model is loaded.

A bad value refused after ``run.json`` already holds it poisons the directory: the corrected rerun
is then refused as a settings mismatch. Each case here must end in one ``vps <cmd>: error: ...`` line
naming the flag, file or field, with no model loaded and nothing written.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from tests.helpers.tiny_eval import SYSTEM, FakeRefine, settings_for, tiny_tokenizer, write_data
from vps import VPSConfig, cli
from vps.evaluation import MethodSpec, RunDir, rescore_run, run_evaluation
from vps.evaluation.methods import refine as refine_mod
from vps.evaluation.settings import RunSettings, SettingError

TOK = tiny_tokenizer()

pytestmark = pytest.mark.usefixtures("one_thread")


def _no_load(monkeypatch):
    monkeypatch.setattr("vps.commands.eval.load", lambda args: pytest.fail("the model must not be loaded"))


def _one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"vps {command}: error: "), err
    return last


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# -- RunSettings --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, overrides, field, needle", [
    ("iters zero", {"refine_iters": 0}, "refine_iters", "refine_iters must be >= 1"),
    ("iters negative", {"refine_iters": -2}, "refine_iters", "refine_iters must be >= 1"),
    ("k-samples negative", {"refine_k_samples": -1}, "refine_k_samples", r"refine_k_samples must be in \[0, 64\]"),
    ("k-samples huge", {"refine_k_samples": 10**6}, "refine_k_samples", r"refine_k_samples must be in \[0, 64\]"),
    ("temperature tiny", {"temperature": 1e-300}, "temperature", "temperature must be 0 .greedy. or >= 0.0001"),
    ("temperature negative", {"temperature": -0.5}, "temperature", "temperature must be 0 .greedy. or >= 0.0001"),
    ("seed huge", {"seed": 10**23}, "seed", r"seed must be a whole number in \[0, 2\*\*63 - 1\]"),
    ("seed negative", {"seed": -1}, "seed", r"seed must be a whole number in \[0, 2\*\*63 - 1\]"),
    ("shots huge", {"prompt": "fewshot", "system": None, "shots": 100000}, "shots", r"shots must be in \[1, 64\]"),
    ("temperature nan", {"temperature": float("nan")}, "temperature", "finite"),
    ("temperature inf", {"temperature": float("inf")}, "temperature", "finite"),
    ("temperature -inf", {"temperature": float("-inf")}, "temperature", "finite"),
    ("stop empty", {"stop_strings": [""]}, "stop_strings", "non-empty"),
    ("stop empty among others", {"stop_strings": ["\nQ:", ""]}, "stop_strings", "non-empty"),
    ("stop not text", {"stop_strings": [3]}, "stop_strings", "non-empty text"),
    ("stop a bare string", {"stop_strings": "\nQ:"}, "stop_strings", "list of strings"),
    ("max new tokens", {"max_new_tokens": 0}, "max_new_tokens", "max_new_tokens must be >= 1"),
])
def test_run_settings_refuse_bad_values(tmp_path, name, overrides, field, needle):
    data = write_data(tmp_path / "d.jsonl")
    with pytest.raises(SettingError, match=needle) as err:
        settings_for(data, **overrides)
    assert err.value.field == field, name


@pytest.mark.parametrize("name, overrides", [
    ("k-samples zero without refine", {"refine_k_samples": 0}),
    ("one stop string", {"stop_strings": ["END"]}),
    ("no stop strings", {"stop_strings": []}),
    ("positive temperature", {"temperature": 0.7}),
])
def test_run_settings_accept_good_values(tmp_path, name, overrides):
    _, settings = settings_for(write_data(tmp_path / "d.jsonl"), **overrides)
    assert settings.to_dict()["temperature"] == overrides.get("temperature", 0.0), name


# -- the harness: checked before anything is written -------------------------------------------------
@pytest.mark.parametrize("name, methods, overrides, records, needle", [
    ("oracle without a gold", ["base", "refine-oracle"], {},
     [{"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "#### 7"},
      {"question": "q?", "answer": "####"}, {"question": "r?", "answer": ""}],
     r"refine-oracle needs each item's gold answer, and 2 item\(s\) have none: 'd-2', 'd-3'"),
    ("refine with no samples", ["refine-self"], {"refine_k_samples": 0},
     [{"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "#### 7"}],
     "refine_k_samples is 0, and refine-self would then skip self-consistency"),
    ("votes in an NLL-only run", ["maj@3"], {"generate": False, "nll": True},
     [{"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "#### 7"}],
     "NLL-only run"),
    ("a question beyond the context", ["base"], {},
     [{"question": "Tom has 3 apples. " * 120, "answer": "#### 7"}],
     r"item 'd-1': its prompt is [\d,]+ tokens, and --max-new-tokens 4 take it beyond the model's context of 2,048"),
    ("new tokens beyond the context", ["base"], {"max_new_tokens": 10**6},
     [{"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "#### 7"}],
     "--max-new-tokens 1000000 take it beyond the model's context of 2,048 tokens"),
    ("a gold solution beyond the context", ["base"], {"generate": False, "nll": True},
     [{"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "3 + 4 = 7. " * 200 + "#### 7"}],
     r"its gold solution \(\d+ tokens\) take it beyond"),
    ("a lone surrogate in a question", ["base"], {},
     [{"question": "Tom has \ud800 apples. How many?", "answer": "#### 7"}],
     "item 'd-1': its prompt cannot be built or encoded"),
    ("a rank beyond the layers", ["base", "vps@rank"], {},
     [{"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "#### 7"}],
     "configuration 'vps' cannot patch this model: rank 60 exceeds min"),
])
def test_run_evaluation_checks_everything_before_writing(tmp_path, model, name, methods, overrides, records,
                                                          needle):
    data = _write(tmp_path / "d.jsonl", records)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the loader's note on items without a gold
        items, settings = settings_for(data, **{"nll": False, **overrides})
    specs = [MethodSpec("vps", "vps", VPSConfig(rank=60, topk=60)) if m == "vps@rank" else
             MethodSpec(m, m.split("@")[0], votes=int(m.split("@")[1]) if "@" in m else None) for m in methods]
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=needle):
        run_evaluation(model, TOK, items, specs, out, settings, progress=False, refine_fn=FakeRefine(),
                       log=lambda _m: None)
    assert not out.exists(), f"{name}: something was written"


# -- the CLI: one named line, no model, nothing written -------------------------------------------------
GOLDLESS = [{"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "#### 7"},
            {"question": "q?", "answer": "####"}]


@pytest.mark.parametrize("name, extra, needle", [
    ("iters zero", ["--methods", "refine-self", "--iters", "0"], "--iters: refine_iters must be >= 1, got 0"),
    ("k-samples negative", ["--k-samples", "-1"], "--k-samples: refine_k_samples must be in [0, 64], got -1"),
    ("k-samples zero with refine", ["--methods", "base,refine-self", "--k-samples", "0"],
     "--k-samples: refine_k_samples is 0"),
    ("temperature nan", ["--temperature", "nan"], "--temperature: temperature must be a finite number, got nan"),
    ("temperature inf", ["--temperature", "inf"], "--temperature: temperature must be a finite number, got inf"),
    ("stop empty", ["--stop", ""], "--stop: stop strings must be non-empty"),
    ("limit negative", ["--limit", "-1"], "--limit must be >= 0, got -1"),
    ("offset negative", ["--offset", "-3"], "--offset must be >= 0, got -3"),
    ("batch size", ["--batch-size", "0"], "--batch-size must be >= 1"),
    ("threads", ["--threads", "0"], "--threads must be in [1, 1024], got 0"),
    ("offset past the end", ["--offset", "9"], "no items to evaluate: --offset 9 select(s) none of the 5 items"),
    ("limit zero", ["--limit", "0"], "--limit 0 select(s) none of the 5 items"),
    ("oracle without a gold", ["--data", "GOLDLESS", "--methods", "refine-oracle"],
     "refine-oracle needs each item's gold answer, and 1 item(s) have none: 'goldless-2'"),
    ("empty data file", ["--data", "EMPTY"], "--data: EMPTY has no items to evaluate"),
    ("only malformed lines", ["--data", "BROKEN"], "--data: BROKEN has no items to evaluate (1 malformed line(s)"),
    ("data is a directory", ["--data", "DIR"], "--data"),
    ("out is a file", ["--out", "FILE"], "--out FILE is a file, not a directory"),
    ("out below a file", ["--out", "FILE/run"], "--out FILE/run: FILE is a file, not a directory"),
    ("out holds a report but no run", ["--out", "FOREIGN"],
     "--out FOREIGN holds report.md but no run.json: it is not a run directory"),
    ("seed beyond torch", ["--seed", "99999999999999999999999"],
     "--seed: seed must be a whole number in [0, 2**63 - 1]"),
    ("threads beyond torch", ["--threads", "99999999999999999999"], "--threads must be in [1, 1024]"),
    ("temperature tiny", ["--temperature", "1e-300"], "--temperature: temperature must be 0 (greedy) or >= 0.0001"),
    ("shots huge", ["--prompt", "fewshot", "--shots", "100000"], "--shots must be in [1, 64], got 100000"),
    ("votes huge", ["--methods", "maj@1000000"], "'maj@1000000': method 'maj' needs votes (k) in [1, 64]"),
    ("k-samples huge", ["--methods", "refine-self", "--k-samples", "1000"], "--k-samples: refine_k_samples must be in"),
])
def test_cli_errors_are_one_named_line_before_anything_is_written(tmp_path, monkeypatch, capsys, name, extra,
                                                                   needle):
    _no_load(monkeypatch)
    paths = {"GOLDLESS": _write(tmp_path / "goldless.jsonl", GOLDLESS), "EMPTY": tmp_path / "empty.jsonl",
             "BROKEN": tmp_path / "broken.jsonl", "DIR": tmp_path / "adir", "FILE": tmp_path / "afile",
             "FOREIGN": tmp_path / "foreign"}
    paths["EMPTY"].write_text("")
    paths["BROKEN"].write_text("{not json\n")
    paths["DIR"].mkdir()
    paths["FILE"].write_text("keep me")
    paths["FOREIGN"].mkdir()
    (paths["FOREIGN"] / "report.md").write_text("someone's report")
    extra = [str(paths[x]) if x in paths else x.replace("FILE", str(paths["FILE"])) for x in extra]
    for key, path in paths.items():
        needle = needle.replace(key, str(path))
    out = tmp_path / "out"
    argv = ["eval", "--data", str(write_data(tmp_path / "d.jsonl")), "--out", str(out), "--max-new-tokens", "3",
            "--no-progress", *extra]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the loader's notes on malformed lines and missing golds
        assert cli.main(argv) == 2, name
    line = _one_error_line(capsys, "eval")
    assert needle in line, f"{name}: {line}"
    if name != "empty data file":
        assert "--offset" not in line or "--offset" in " ".join(extra), f"{name}: --offset not given: {line}"
    assert not out.exists(), f"{name}: --out was written"
    assert paths["FILE"].read_text() == "keep me"
    assert (paths["FOREIGN"] / "report.md").read_text() == "someone's report"
    assert sorted(p.name for p in paths["FOREIGN"].iterdir()) == ["report.md"]


@pytest.mark.parametrize("name, bad, good, stored", [
    ("iters", ["--iters", "0"], ["--iters", "1"], ("refine_iters", 1)),
    ("k-samples", ["--k-samples", "-1"], ["--k-samples", "2"], ("refine_k_samples", 2)),
    ("temperature", ["--temperature", "nan"], ["--temperature", "0"], ("temperature", 0.0)),
    ("stop", ["--stop", ""], ["--stop", "END"], ("stop_strings", ["END"])),
])
def test_a_refused_value_leaves_nothing_that_blocks_the_corrected_rerun(tmp_path, model, monkeypatch, capsys,
                                                                         name, bad, good, stored):
    fake = FakeRefine()
    monkeypatch.setattr(refine_mod, "_default_refine", lambda: fake)
    monkeypatch.setattr("vps.commands.eval.load", lambda args: (model, TOK))
    out = tmp_path / "out"
    argv = ["eval", "--data", str(write_data(tmp_path / "d.jsonl")), "--methods", "base,refine-self", "--out",
            str(out), "--max-new-tokens", "3", "--system", SYSTEM, "--no-progress", "--limit", "2"]
    assert cli.main([*argv, *bad]) == 2, name
    assert not out.exists()
    assert cli.main([*argv, *good]) == 0, capsys.readouterr().err
    key, value = stored
    assert json.loads((out / "run.json").read_text())[key] == value
    assert len(RunDir(out).read_rows()) == 4


# -- ablate --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, only, expected", [
    ("one configuration", "g3", ["baseline", "g3"]),
    ("two configurations", "g3,sk", ["baseline", "g3", "sk"]),
    ("all of them", None, ["baseline", "g3", "sk", "g7"]),
])
def test_ablate_list_shows_what_only_keeps(tmp_path, capsys, name, only, expected):
    grid = tmp_path / "g.json"
    grid.write_text(json.dumps({"baseline": {"method": "base"}, "g3": {"gamma": 0.3}, "sk": {"builder": "sk"},
                                "g7": {"gamma": 0.7}}))
    assert cli.main(["ablate", "--list", "--grid", str(grid), *(["--only", only] if only else [])]) == 0
    listed = [line.split(":")[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == expected, name


def test_ablate_list_refuses_an_unknown_only(tmp_path, capsys):
    grid = tmp_path / "g.json"
    grid.write_text(json.dumps({"baseline": {"method": "base"}, "g3": {"gamma": 0.3}}))
    assert cli.main(["ablate", "--list", "--grid", str(grid), "--only", "g9"]) == 2
    assert "--only: ['g9'] not in the grid" in _one_error_line(capsys, "ablate")


# -- rescore -------------------------------------------------------------------------------------------
@pytest.fixture
def finished_run(tmp_path, model):
    from tests.helpers.tiny_eval import fake_generate

    items, settings = settings_for(write_data(tmp_path / "d.jsonl"), nll=False)
    out = tmp_path / "run"
    run_evaluation(model, TOK, items[:2], [MethodSpec("base", "base")], out, settings, progress=False,
                   generate_fn=fake_generate({"base": {0}, "vps": set()}), log=lambda _m: None)
    return out


@pytest.mark.parametrize("name, run, out, needle", [
    ("out is a file", "RUN", "FILE", "--out FILE is a file, not a directory"),
    ("out below a file", "RUN", "FILE/x", "--out FILE/x: FILE is a file, not a directory"),
    ("out holds a report but no run", "RUN", "FOREIGN", "--out FOREIGN holds report.md but no run.json"),
    ("run is a file", "FILE", "NEW", "FILE is a file, not an evaluation directory"),
])
def test_rescore_target_errors_are_one_named_line(tmp_path, finished_run, capsys, name, run, out, needle):
    paths = {"RUN": finished_run, "FILE": tmp_path / "afile", "FOREIGN": tmp_path / "foreign",
             "NEW": tmp_path / "new"}
    paths["FILE"].write_text("keep me")
    paths["FOREIGN"].mkdir()
    (paths["FOREIGN"] / "report.md").write_text("someone's report")

    def sub(text: str) -> str:
        for key in ("FOREIGN", "FILE", "RUN", "NEW"):
            text = text.replace(key, str(paths[key]))
        return text

    assert cli.main(["rescore", sub(run), "--extract", "last", "--out", sub(out)]) == 2, name
    assert sub(needle) in _one_error_line(capsys, "rescore"), name
    assert paths["FILE"].read_text() == "keep me"
    assert sorted(p.name for p in paths["FOREIGN"].iterdir()) == ["report.md"]
    assert not paths["NEW"].exists()
    with pytest.raises(ValueError):
        rescore_run(sub(run), sub(out), "last")


def test_an_unknown_setting_field_is_named(tmp_path):
    with pytest.raises(SettingError) as err:
        RunSettings(model="m", data={}, extract_mode="shortest")
    assert err.value.field == "extract_mode" and "extract_mode must be one of" in str(err.value)
