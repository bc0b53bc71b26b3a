"""`vps tune`: studies on a tiny 3-block Llama, resume after a kill, the space file, the test-split refusal,
pruning, the Pareto objective, and the command line as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tests.helpers.tiny import tiny_gpt2
from tests.helpers.tiny_eval import QUESTIONS, tiny_tokenizer
from vps import VPSConfig, patched, vps_layers
from vps._io import RunLockedError, RunMismatchError
from vps.cli import main
from vps.evaluation import RunDir, load_grid
from vps.tuning import SpaceError, TestSplitError, parse_space, tune
from vps.tuning.placement import Placement, trial_config
from vps.tuning.study import open_study

ROOT = Path(__file__).resolve().parents[2]


def tiny3(tok, seed: int = 0) -> LlamaForCausalLM:
    """Three blocks, so that early / middle / late thirds exist."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.1,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny3(tok)


def train_file(directory: Path, name: str = "train.jsonl", copies: int = 2) -> Path:
    """GSM8K-style items (the five tiny questions, ``copies`` times with distinct wording)."""
    lines = [json.dumps({"question": f"{q} (v{c})", "answer": a}) for c in range(copies) for q, a in QUESTIONS]
    path = directory / name
    path.write_text("\n".join(lines) + "\n")
    return path


SMALL_SPACE = {"gamma": {"low": 0.01, "high": 0.5, "log": True}, "rank": {"low": 1, "high": 3},
               "builder": ["sk", "sc"], "blocks": ["all", "late"]}


def run(model, tok, out: Path, data: Path, n: int, space=None, **kw):
    return tune(model, tok, out, n_trials=n, data=str(data), sample=None,
                space=parse_space(space or SMALL_SPACE), batch_size=4, model_name="tiny3", progress=False, **kw)


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]


# -- a study and its outputs -----------------------------------------------------------------------------
def test_three_trial_study_writes_every_output(model, tok, tmp_path):
    data = train_file(tmp_path)
    result = run(model, tok, tmp_path / "study", data, 3)
    out = tmp_path / "study"
    assert result.counted == 3
    trials = rows(out)
    assert [t["number"] for t in trials] == [0, 1, 2]
    done = [t for t in trials if t["state"] == "complete"]
    assert done, trials
    for t in done:
        lo, hi = t["ci"]
        assert lo <= t["nll_diff"] <= hi and t["n"] == 10 and t["seconds"] > 0
        fb = t["fallbacks"]  # every item was scored in this process, so every item was counted
        assert fb["items"] == 10 and 0 <= fb["items_with_any"] <= 10 and fb["total"] >= fb["items_with_any"]
    best = min(done, key=lambda t: t["nll_diff"])
    assert result.best_number == best["number"] and result.best_value == pytest.approx(best["nll_diff"])
    cfg = VPSConfig.load(out / "best.json")  # as vps eval --config reads it
    assert cfg == result.best_config
    assert cfg.to_dict() == {**best["config"], "version": cfg.version}
    meta = json.loads((out / "best_trial.json").read_text())
    assert meta["number"] == best["number"] and meta["tuned_on"]["source"] == str(data)
    assert any("vps eval" in c and "gsm8k:test" in c for c in meta["confirm"])
    assert all("--dtype float32" in c for c in meta["confirm"] + meta["confirm_grid"])
    assert all(f"vps ablate --grid {out / 'confirm.yaml'}" in c for c in meta["confirm_grid"])
    grid = load_grid(out / "confirm.yaml")  # as vps ablate --grid reads it
    assert [(g.name, g.method) for g in grid] == [("base", "base"), ("vps", "vps"), ("tuned", "vps")]
    assert grid[1].config == VPSConfig() and grid[2].config == cfg
    report = (out / "report.md").read_text()
    assert f"Trial {best['number']}" in report and "## Parameter importances" in report
    assert f"Fallbacks to the base output: {best['fallbacks']['items_with_any']} of the 10 items" in report
    assert "10 items (sample None, seed 0)" in report
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    base = json.loads((out / "base_nll.json").read_text())
    assert len(base["nll"]) == 10 and all(v > 0 for v in base["nll"].values())


def test_trial_value_is_the_paired_nll_difference(model, tok, tmp_path):
    from vps.evaluation.nll import solution_nll
    from vps.prompting import PromptFormat

    data = train_file(tmp_path, copies=1)
    out = tmp_path / "study"
    run(model, tok, out, data, 1)
    trial = rows(out)[0]
    cfg = VPSConfig.from_dict(trial["config"])
    fmt = PromptFormat("tutor")
    prompts = [fmt.render(tok, f"{q} (v0)") for q, _ in QUESTIONS]
    answers = [a for _, a in QUESTIONS]
    base = [r.nll for r in solution_nll(model, tok, prompts, answers)]
    with patched(model, cfg):
        vps_nll = [r.nll for r in solution_nll(model, tok, prompts, answers)]
    expected = sum(v - b for v, b in zip(vps_nll, base, strict=True)) / len(base)
    assert trial["nll_diff"] == pytest.approx(expected, abs=1e-5)


def test_resume_adds_only_missing_trials(model, tok, tmp_path):
    data = train_file(tmp_path)
    out = tmp_path / "study"
    run(model, tok, out, data, 2)
    first = rows(out)
    base_mtime = (out / "base_nll.json").stat().st_mtime_ns
    run(model, tok, out, data, 2)  # nothing missing: no new trial
    assert rows(out) == first
    run(model, tok, out, data, 4)
    again = rows(out)
    assert [t["number"] for t in again] == [0, 1, 2, 3]
    assert again[:2] == first
    assert (out / "base_nll.json").stat().st_mtime_ns == base_mtime  # the unpatched NLLs are computed once
    # the resumed sampler does not replay the first trials' random draws
    assert again[2]["params"] != first[0]["params"]


def test_mismatched_resume_and_second_writer_are_refused(model, tok, tmp_path):
    data = train_file(tmp_path)
    out = tmp_path / "study"
    run(model, tok, out, data, 1)
    with pytest.raises(RunMismatchError, match="batch_size") as err:
        tune(model, tok, out, n_trials=2, data=str(data), sample=None, space=parse_space(SMALL_SPACE), batch_size=2,
             model_name="tiny3", progress=False)
    # vps._io.check_resume's message, as for an eval run: every difference, and where the stored settings are
    assert f"{out} holds a study with different settings" in str(err.value) and "\n" not in str(err.value)
    assert "batch_size: stored 4, now 2" in str(err.value) and f"(see {out / 'tune.json'})" in str(err.value)


class _in_other_process_lock:
    """The directory's lock held by a child process for the block (a second writer)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def __enter__(self):
        code = ("import sys,time; from vps._io import lock_directory\n"
                "with lock_directory(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)\n")
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(self.directory)], stdout=subprocess.PIPE,
                                     text=True)
        assert self.proc.stdout.readline().strip() == "held"
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


def test_second_writer_is_refused(model, tok, tmp_path):
    data = train_file(tmp_path)
    out = tmp_path / "study"
    with _in_other_process_lock(out), pytest.raises(RunLockedError, match="in use by another run"):
        run(model, tok, out, data, 1)
    assert not (out / "study.db").exists()


# -- kill and resume ------------------------------------------------------------------------------------
KILLER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, sys.argv[3])
    import torch
    torch.set_num_threads(1)
    from pathlib import Path
    from tests.tuning.test_tune import SMALL_SPACE, tiny3
    from tests.helpers.tiny_eval import tiny_tokenizer
    import vps.tuning.study as study
    from vps.tuning import parse_space, tune

    real = study.score_trial
    calls = []

    def killing(model, tok, cfg, task, base, report=None, progress=None, **kw):
        calls.append(1)
        if len(calls) == 2:  # the second trial dies after its first batch, as under SIGKILL
            def dying(value, step):
                report(value, step)
                os.kill(os.getpid(), signal.SIGKILL)
            return real(model, tok, cfg, task, base, dying, progress, **kw)
        return real(model, tok, cfg, task, base, report, progress, **kw)

    study.score_trial = killing
    tok = tiny_tokenizer()
    tune(tiny3(tok), tok, Path(sys.argv[1]), n_trials=3, data=sys.argv[2], sample=None,
         space=parse_space(SMALL_SPACE), batch_size=4, model_name="tiny3", progress=False)
""")


def test_killed_trial_is_failed_not_counted_and_rerun(model, tok, tmp_path):
    data = train_file(tmp_path)
    out = tmp_path / "study"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", KILLER, str(out), str(data), str(ROOT)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    killed_study = open_study(out, _settings(out))
    states = [t.state.name for t in killed_study.trials]
    assert states == ["COMPLETE", "RUNNING"], states
    killed_params = killed_study.trials[1].params
    first_value = killed_study.trials[0].values[0]
    # the killed trial's first batch (4 items) survived the kill, to be taken up by its re-run
    saved = json.loads((out / "partial_trial.json").read_text())
    assert len(saved["nll"]) == 4

    result = run(model, tok, out, data, 3)
    assert not (out / "partial_trial.json").exists()
    trials = rows(out)
    assert [t["state"] for t in trials[:2]] == ["complete", "interrupted"]
    counted = [t for t in trials if t["state"] != "interrupted"]
    assert len(counted) == 3 == result.counted
    retry = trials[2]
    assert retry["retry_of"] == 1 and retry["params"] == killed_params and retry["state"] == "complete"
    assert trials[0]["nll_diff"] == pytest.approx(first_value)
    assert len({t["number"] for t in trials}) == len(trials)  # nothing duplicated
    assert result.best_value == pytest.approx(min(t["nll_diff"] for t in counted if t["state"] == "complete"))
    assert "1 interrupted" in (out / "report.md").read_text()


def _settings(out: Path):
    from vps.tuning import TuneSettings

    return TuneSettings(**{k: v for k, v in json.loads((out / "tune.json").read_text()).items()
                           if k not in ("format", "vps_version")})


# -- pruning and the second objective ----------------------------------------------------------------------
def test_pruner_prunes_a_clearly_worse_trial(model, tok, tmp_path):
    data = train_file(tmp_path, copies=3)  # 15 items: 4 batches of 4
    out = tmp_path / "study"
    space = {"gamma": [0.01, 1.0], "tau": [2.0], "rank": [4], "builder": ["sk"]}
    run(model, tok, out, data, 1, space=space, prune_startup=1, prune_warmup=0)  # creates the study
    study = open_study(out, _settings(out))
    for gamma in (0.01, 1.0):
        study.enqueue_trial({"gamma": gamma, "tau": 2.0, "rank": 4, "builder": "sk"})
    run(model, tok, out, data, 3, space=space, prune_startup=1, prune_warmup=0)
    trials = rows(out)
    by_gamma = {t["params"]["gamma"]: t for t in trials[1:]}
    assert by_gamma[0.01]["state"] == "complete"
    worse = by_gamma[1.0]
    assert worse["state"] == "pruned", trials
    assert worse["steps"] < 4 and worse["pruned_at"] is not None


def test_overhead_objective_gives_a_pareto_study(model, tok, tmp_path):
    data = train_file(tmp_path, copies=1)
    out = tmp_path / "study"
    result = run(model, tok, out, data, 2, objectives=("nll", "overhead"))
    trials = rows(out)
    assert all(t["state"] == "complete" and t["overhead"] > 0 for t in trials)
    assert result.best_value == pytest.approx(min(t["nll_diff"] for t in trials))
    assert "prefill x" in (out / "report.md").read_text()


# -- the space file, placement and the test split -----------------------------------------------------
@pytest.mark.parametrize("space, needle", [
    ({"rnak": [1, 2]}, "'rnak' is not a tunable parameter"),
    ({"gamma": {"low": 0.1, "high": 2.0}}, "'gamma'.*gamma must be a finite number in"),
    ({"gamma": {"low": 0.5, "high": 0.1}}, "'gamma': low 0.5 is above high 0.1"),
    ({"tau": {"low": 0, "high": 1, "log": True}}, "'tau': a log range needs low > 0"),
    ({"rank": {"low": 1.5, "high": 4}}, "'rank': rank is an integer"),
    ({"builder": ["sk", "nope"]}, "'builder'.*builder must be one of"),
    ({"modules": ["all", "ffn"]}, "'modules': 'ffn' is not one of"),
    ({"blocks": {"low": 0, "high": 1}}, "'blocks': takes a list of choices"),
    ({"rank": []}, "'rank': an empty list"),
    ({"rank": 2}, "nothing to search"),
    ({"gamma": {"low": -0.5, "high": 0.5}}, "allow_damping"),
    ({"allow_damping": "yes", "rank": [1]}, "'allow_damping' must be true or false"),
    (["rank"], "must be a non-empty mapping"),
])
def test_bad_space_is_refused_naming_the_key(space, needle):
    with pytest.raises(SpaceError, match=needle):
        parse_space(space, source="space.yaml")


def test_bad_space_file_is_refused_by_the_cli_before_loading(tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text("rank: {low: 1, high: 4}\ngamma: [0.1, 3.0]\n")
    rc = main(["tune", "--space", str(space), "--model", str(tmp_path / "no-such-model"), "--out",
               str(tmp_path / "study"), "--data", str(train_file(tmp_path))])
    err = capsys.readouterr().err
    assert rc == 2 and "--space" in err and "'gamma'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "study").exists()


def test_bundled_space_parses():
    from vps.tuning import load_space

    space = load_space()
    names = {p.name for p in space.params}
    assert {"rank", "topk", "gamma", "tau", "builder", "order", "adaptive_rank", "adaptive_gamma", "qk_coupling",
            "scope", "alpha", "modules", "blocks"} <= names


def test_test_split_is_refused_unless_overridden(model, tok, tmp_path, capsys):
    rc = main(["tune", "--data", "gsm8k:test", "--out", str(tmp_path / "s"), "--model", str(tmp_path / "none")])
    assert rc == 2 and "test split" in capsys.readouterr().err
    test_file = train_file(tmp_path, name="my_test.jsonl", copies=1)
    with pytest.raises(TestSplitError, match="--allow-test-split"):
        run(model, tok, tmp_path / "s", test_file, 1)
    out = tmp_path / "labelled"
    run(model, tok, out, test_file, 1, allow_test=True)
    assert all("TUNED ON TEST DATA" in t["labels"] for t in rows(out))
    assert "TUNED ON TEST DATA" in (out / "report.md").read_text()


def test_placement_of_llama_and_gpt2(model, tok):
    place = Placement.of(model)
    assert place.n_blocks == 3
    assert place.attention == ("self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj")
    assert place.mlp == ("mlp.down_proj", "mlp.gate_proj", "mlp.up_proj")
    chosen = trial_config({"modules": "mlp", "blocks": "late", "rank": 6, "topk": 4}, place)
    assert chosen.config.topk == 6 and chosen.config.layers == [2]
    with patched(model, chosen.config):
        names = sorted(vps_layers(model))
    assert names == ["model.layers.2.mlp.down_proj", "model.layers.2.mlp.gate_proj", "model.layers.2.mlp.up_proj"]
    gpt = Placement.of(tiny_gpt2())
    assert gpt.attention == ("attn.c_attn", "attn.c_proj") and gpt.mlp == ("mlp.c_fc", "mlp.c_proj")
    with patched(gpt2 := tiny_gpt2(), trial_config({"modules": "attention"}, gpt).config):
        assert sorted(vps_layers(gpt2)) == sorted(f"transformer.h.{i}.attn.{m}" for i in range(2)
                                                  for m in ("c_attn", "c_proj"))
    with pytest.raises(SpaceError, match="too few for thirds"):
        gpt.check(("all",), ("all", "early"))


# -- the command line, as users run it ----------------------------------------------------------------------
def test_cli_tune_end_to_end_then_eval_reads_best(tok, tmp_path):
    ckpt = tmp_path / "ckpt"
    tiny3(tok).save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    data = train_file(tmp_path, copies=1)
    space = tmp_path / "space.yaml"
    space.write_text("gamma: {low: 0.01, high: 0.5, log: true}\nmodules: [all, attention]\n")
    out = tmp_path / "study"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "vps.cli", "tune", "--model", str(ckpt), "--data", str(data), "--sample", "4",
           "--trials", "2", "--batch-size", "2", "--space", str(space), "--out", str(out), "--threads", "1",
           "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "best is trial" in proc.stdout and "confirm on GSM8K test" in proc.stdout
    assert "--config " + str(out / "best.json") in proc.stdout
    assert f"vps ablate --grid {out / 'confirm.yaml'}" in proc.stdout and "--dtype float32" in proc.stdout
    evaluated = subprocess.run([sys.executable, "-m", "vps.cli", "eval", "--model", str(ckpt), "--data", str(data),
                                "--limit", "2", "--methods", "base,vps", "--nll-only", "--config",
                                str(out / "best.json"), "--out", str(tmp_path / "confirm"), "--threads", "1",
                                "--no-progress"], env=env, capture_output=True, text=True, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr
    run_json = json.loads((tmp_path / "confirm" / "run.json").read_text())
    assert run_json["configs"]["vps"]["config"] == {**VPSConfig.load(out / "best.json").to_dict(),
                                                    "version": run_json["configs"]["vps"]["config"]["version"]}


def test_confirm_grid_adds_only_the_tuned_rows_to_a_seed_run(model, tok, tmp_path, monkeypatch, capsys):
    data = train_file(tmp_path)
    study = tmp_path / "study"
    run(model, tok, study, data, 2)
    monkeypatch.setattr("vps.commands.eval.load", lambda args: (model, tok))
    out = tmp_path / "seed"
    common = ["--data", str(data), "--limit", "4", "--batch-size", "2", "--nll-only", "--no-progress",
              "--out", str(out)]
    assert main(["eval", "--methods", "base,vps", *common]) == 0
    before = RunDir(out).read_rows()
    assert main(["ablate", "--grid", str(study / "confirm.yaml"), *common]) == 0
    after = RunDir(out).read_rows()
    assert after[:len(before)] == before and len(before) == 8  # base and seed rows kept, not recomputed
    assert sorted(r["id"] for r in after[len(before):] if r["config"] == "tuned") == sorted(
        r["id"] for r in before if r["config"] == "base") and len(after) == 12
    stored = json.loads((out / "run.json").read_text())["configs"]
    assert VPSConfig.from_dict(stored["tuned"]["config"]) == VPSConfig.load(study / "best.json")
    assert VPSConfig.from_dict(stored["vps"]["config"]) == VPSConfig()
    summary = json.loads((out / "summary.json").read_text())
    tuned = next(c for c in summary["configs"] if c["name"] == "tuned")
    assert tuned["vs_baseline"]["n"] == 4
    # A study that has since found another best no longer matches the run it confirmed: refused, named.
    VPSConfig(rank=1, topk=4, gamma=0.01).save(study / "best.json")
    capsys.readouterr()
    assert main(["ablate", "--grid", str(study / "confirm.yaml"), *common]) != 0
    assert "configuration 'tuned' changed" in capsys.readouterr().err
    assert RunDir(out).read_rows() == after


def test_damping_trials_only_when_the_space_allows_and_labelled(model, tok, tmp_path):
    with pytest.raises(SpaceError, match="allow_damping"):
        parse_space({"gamma": [-0.3, 0.3]})
    space = {"allow_damping": True, "gamma": [-0.3, 0.3], "rank": [2]}
    data = train_file(tmp_path, copies=1)
    out = tmp_path / "study"
    run(model, tok, out, data, 1, space=space)
    study = open_study(out, _settings(out))
    for gamma in (-0.3, 0.3):
        study.enqueue_trial({"gamma": gamma, "rank": 2})
    run(model, tok, out, data, 3, space=space)
    trials = {t["params"]["gamma"]: t for t in rows(out)[1:]}
    assert trials[-0.3]["labels"] == ["DAMPING"] and trials[-0.3]["config"]["damping"] is True
    assert trials[-0.3]["config"]["gamma"] == 0.3
    assert trials[0.3]["labels"] == [] and trials[0.3]["config"]["damping"] is False
    assert trials[-0.3]["nll_diff"] != pytest.approx(trials[0.3]["nll_diff"])
    assert "DAMPING" in (out / "report.md").read_text()


def test_digest_reports_a_study_from_its_database(model, tok, tmp_path):
    from vps.evaluation.digest import build_results

    data = train_file(tmp_path, copies=1)
    out = tmp_path / "study"
    run(model, tok, out, data, 2)
    (out / "report.md").unlink()
    text = build_results({"title": "R", "sections": [{"title": "Tuning", "dir": "study", "command": "vps tune"}]},
                         tmp_path)
    best = min((t for t in rows(out) if t["state"] == "complete"), key=lambda t: t["nll_diff"])
    assert f"#{best['number']}" in text and f"{best['nll_diff']:+.4f}" in text
    assert "only the test confirmation counts" in text and "## Top trials" in text
    assert (out / "report.md").exists()


def test_a_rerun_trial_takes_the_batches_its_interrupted_run_scored(model, tok, tmp_path, monkeypatch):
    """Stored batches are not scored again, newly scored ones are stored, and the pruner sees the same
    running means; another configuration ignores the file."""
    from vps.config import VPSConfig
    from vps.tuning.objective import PartialScores, ScoringTask, score_trial

    task = ScoringTask.build([f"i{k}" for k in range(6)], ["Q: 2 + 2?"] * 3 + ["Q: 3 + 4?"] * 3,
                             [" 4"] * 3 + [" 7"] * 3, tok, batch_size=2)
    base = {f"i{k}": 1.0 for k in range(6)}
    cfg = VPSConfig(gamma=0.2)
    means_fresh, means_resumed = [], []
    fresh = score_trial(model, tok, cfg, task, base, lambda v, s: means_fresh.append(v) and False)
    partial = PartialScores(tmp_path, {"study": 1}, cfg.to_dict())
    partial.add({"i0": fresh.nll["i0"], "i1": fresh.nll["i1"]})  # as if killed after the first batch
    calls = []
    real = ScoringTask.score
    monkeypatch.setattr(ScoringTask, "score",
                        lambda self, m, t, batch: calls.append(list(batch)) or real(self, m, t, batch))
    again = PartialScores(tmp_path, {"study": 1}, cfg.to_dict())
    resumed = score_trial(model, tok, cfg, task, base, lambda v, s: means_resumed.append(v) and False,
                          partial=again)
    assert calls == [[2, 3], [4, 5]], "the stored batch was scored again"
    assert resumed.nll == pytest.approx(fresh.nll) and means_resumed == pytest.approx(means_fresh)
    assert PartialScores(tmp_path, {"study": 1}, cfg.to_dict()).values.keys() == set(base)
    assert not PartialScores(tmp_path, {"study": 1}, VPSConfig(gamma=0.3).to_dict()).values
    again.clear()
    assert not (tmp_path / PartialScores.FILE).exists()


# -- the test split, by content --------------------------------------------------------------------------
def gsm8k_test_lines(n: int) -> list[str]:
    """The first ``n`` lines of the local GSM8K test file (as `gsm8k:test` resolves it)."""
    from vps.evaluation.data import gsm8k_path

    return gsm8k_path("test").read_text(encoding="utf-8").splitlines()[:n]


def test_a_copy_or_symlink_of_the_test_set_is_refused_by_content(model, tok, tmp_path, capsys):
    from vps.evaluation.data import gsm8k_path

    copy = tmp_path / "dev_questions.jsonl"
    copy.write_text("\n".join(gsm8k_test_lines(20)) + "\n")
    with pytest.raises(TestSplitError, match=r"20 of its 20 questions are in the GSM8K test set .*--allow-test-split"):
        run(model, tok, tmp_path / "s", copy, 1)
    link = tmp_path / "train_copy.jsonl"
    link.symlink_to(gsm8k_path("test"))
    with pytest.raises(TestSplitError, match="1319 of its 1319 questions are in the GSM8K test set"):
        run(model, tok, tmp_path / "s", link, 1)
    # Test questions hidden among others, re-cased and re-spaced: still found, and counted.
    mixed = train_file(tmp_path, name="mixed_train.jsonl", copies=1)
    hidden = []
    for line in gsm8k_test_lines(3):
        record = json.loads(line)
        hidden.append(json.dumps({**record, "question": "  " + record["question"].upper().replace(" ", "   ")}))
    mixed.write_text(mixed.read_text() + "\n".join(hidden) + "\n")
    with pytest.raises(TestSplitError, match="3 of its 8 questions are in the GSM8K test set"):
        run(model, tok, tmp_path / "s", mixed, 1)
    assert not (tmp_path / "s").exists()  # refused before anything was written
    # The command line says the same in one line, naming the flag, and writes nothing.
    rc = main(["tune", "--data", str(copy), "--sample", "20", "--out", str(tmp_path / "cli"), "--model",
               str(tmp_path / "none")])
    err = capsys.readouterr().err
    assert rc == 2 and "--data" in err and "20 of its 20 questions" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "cli").exists()
    # The loud override still works, and labels the study.
    out = tmp_path / "labelled"
    run(model, tok, out, copy, 1, allow_test=True)
    assert json.loads((out / "tune.json").read_text())["on_test"] is True
    assert all("TUNED ON TEST DATA" in t["labels"] for t in rows(out))
    err = capsys.readouterr().err
    assert "TUNED ON TEST DATA" in err and "20 of its 20 questions" in err


@pytest.mark.parametrize("name", ["contest_train.jsonl", "latest.jsonl"])
def test_a_train_file_whose_name_contains_test_is_accepted(model, tok, tmp_path, name):
    data = train_file(tmp_path, name=name, copies=1)
    out = tmp_path / "study"
    result = run(model, tok, out, data, 1)
    assert result.counted == 1
    assert json.loads((out / "tune.json").read_text())["on_test"] is False
    assert all("TUNED ON TEST DATA" not in t["labels"] for t in rows(out))


def test_without_the_gsm8k_test_file_the_content_check_says_it_did_not_run(model, tok, tmp_path, monkeypatch,
                                                                          capsys):
    from vps.tuning import check_split

    copy = tmp_path / "dev_questions.jsonl"
    copy.write_text("\n".join(gsm8k_test_lines(5)) + "\n")  # test questions, but nothing to compare them with
    questions = [json.loads(line)["question"] for line in gsm8k_test_lines(5)]
    empty = tmp_path / "no-data"
    (empty / "gsm8k").mkdir(parents=True)
    monkeypatch.setenv("VPS_DATA_DIR", str(empty))
    messages: list[str] = []
    assert check_split(str(copy), copy, False, questions, log=messages.append) is False
    assert len(messages) == 1 and "content check against the GSM8K test set could not run" in messages[0]
    assert "only the name was checked" in messages[0] and "VPS_DATA_DIR" in messages[0]
    # the name check still refuses a file named as a test split
    with pytest.raises(TestSplitError, match="its name marks a test split"):
        run(model, tok, tmp_path / "s", train_file(tmp_path, name="my_test.jsonl", copies=1), 1)
    assert "could not run" in capsys.readouterr().err


@pytest.mark.parametrize(("name", "says_test"), [
    ("test.jsonl", True), ("my_test.jsonl", True), ("gsm8k-test-copy.jsonl", True), ("tests.jsonl", True),
    ("test2.jsonl", True), ("contest_train.jsonl", False), ("latest.jsonl", False), ("attestation.jsonl", False),
    ("train.jsonl", False)])
def test_the_name_check_reads_test_as_a_word(name, says_test):
    from vps.tuning import name_says_test

    assert name_says_test(f"data/{name}", Path("data") / name) is says_test
    assert name_says_test("gsm8k:test") and name_says_test("gsm8k") and not name_says_test("gsm8k:train")


# -- which failures a trial may record -------------------------------------------------------------------
def test_an_error_while_scoring_is_raised_not_recorded_as_a_failed_trial(model, tok, tmp_path, monkeypatch):
    from vps.tuning import objective
    from vps.tuning.study import counted_trials

    def broken_reset(model):
        raise ValueError("index 7 is out of bounds (a bug, not a verdict on the configuration)")

    monkeypatch.setattr(objective, "reset_state", broken_reset)  # runs only for the patched scoring
    out = tmp_path / "study"
    with pytest.raises(ValueError, match="a bug, not a verdict"):
        run(model, tok, out, train_file(tmp_path, copies=1), 2)
    study = open_study(out, _settings(out))
    assert counted_trials(study) == []  # no "failed" trial counts toward the total
    [cut] = [t for t in study.trials if t.state.name == "FAIL"]
    assert "failure" not in cut.user_attrs
    assert [t.state.name for t in study.trials] == ["FAIL", "WAITING"]  # its parameters queued to run again


def test_a_non_finite_patched_nll_is_a_counted_failure(model, tok, tmp_path, monkeypatch):
    from vps import is_patched
    from vps.tuning.objective import ScoringTask

    real = ScoringTask.score
    monkeypatch.setattr(ScoringTask, "score", lambda self, m, t, batch: [None] * len(batch) if is_patched(m)
                        else real(self, m, t, batch))
    out = tmp_path / "study"
    result = run(model, tok, out, train_file(tmp_path, copies=1), 2)
    assert result.counted == 2 and result.best_number is None
    assert [t["state"] for t in rows(out)] == ["fail", "fail"]
    assert all("NLL on item" in t["failure"] and "is not finite" in t["failure"] for t in rows(out))


def test_a_rank_beyond_a_layer_is_a_refused_configuration(model, tok, tmp_path):
    # tiny3's k_proj / v_proj give 2 heads x 16 = 32 outputs: rank 40 cannot be patched there.
    out = tmp_path / "study"
    result = run(model, tok, out, train_file(tmp_path, copies=1), 1, space={"rank": [40], "gamma": [0.1]})
    assert result.counted == 1
    [trial] = rows(out)
    assert trial["state"] == "fail"
    assert trial["failure"].startswith("configuration refused: rank 40 exceeds min(d_in, d_out) = 32 of layer")


def test_data_without_a_finite_unpatched_nll_is_refused_before_any_trial(model, tok, tmp_path, monkeypatch):
    from vps.tuning.objective import ScoringTask

    monkeypatch.setattr(ScoringTask, "score", lambda self, m, t, batch: [None] * len(batch))
    out = tmp_path / "study"
    with pytest.raises(ValueError, match="no finite NLL on any of the 5 items"):
        run(model, tok, out, train_file(tmp_path, copies=1), 2)
    assert open_study(out, _settings(out)).trials == []


def _fake_rows(n: int) -> list[dict]:
    return [{"number": i, "state": "complete", "nll_diff": -0.01 * i, "ci": [-0.02 * i - 0.01, 0.01]}
            for i in range(n)]


@pytest.mark.parametrize("n_trials, rough", [(3, True), (12, False)])
def test_the_plot_has_integer_trial_ticks_a_title_and_marks_rough_importances(n_trials, rough):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vps.tuning.report import _figure
    from vps.tuning.settings import TuneSettings

    settings = TuneSettings(model="tiny3", data={"source": "train.jsonl", "n_items": 10}, space={})
    fig = _figure(_fake_rows(n_trials), {"gamma": 0.7, "rank": 0.3}, settings)
    try:
        fig.canvas.draw()
        history, importances = fig.axes
        ticks = [t for t in history.get_xticks() if 0 <= t <= n_trials - 1]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks  # no tick at trial 0.5
        assert fig._suptitle.get_text() == "vps tune: tiny3 (float32, prompt tutor) on train.jsonl, 10 items"
        title = importances.get_title()
        assert (f"ROUGH: {n_trials} trials < 10" in title) is rough and title.startswith("parameter importances")
    finally:
        plt.close(fig)


def test_the_report_calls_importances_from_few_trials_rough():
    from types import SimpleNamespace

    from vps.tuning.report import _markdown
    from vps.tuning.settings import TuneSettings

    settings = TuneSettings(model="tiny3", data={"source": "train.jsonl", "n_items": 10}, space={})
    space = SimpleNamespace(source="space.yaml", params=[], fixed={})
    for n, rough in ((3, True), (10, False)):
        rows = [{**r, "labels": [], "params": {}, "overhead": None} for r in _fake_rows(n)]
        text = _markdown(rows, None, settings, space, {"gamma": 1.0}, None, ([], []), "PedAnovaImportanceEvaluator")
        assert ("**Rough**: from only 3 completed trials (fewer than 10)" in text) is rough


@pytest.mark.parametrize("flags, message", [
    (["--seed", "-1"], "--seed must be a whole number in [0, 2**63 - 1], got -1"),
    (["--seed", "99999999999999999999"], "--seed must be a whole number in [0, 2**63 - 1]"),
    (["--prompt", "fewshot", "--shots", "100000"], "--shots must be in [1, 64], got 100000"),
])
def test_tune_refuses_a_seed_or_shots_it_could_not_use_before_writing(tmp_path, capsys, flags, message):
    out = tmp_path / "study"
    assert main(["tune", "--out", str(out), "--model", str(tmp_path / "never-loaded"), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_a_space_with_a_key_twice_is_refused_and_scientific_bounds_are_numbers(tmp_path):
    from vps.tuning import load_space

    (tmp_path / "dup.yaml").write_text("gamma: {low: 0.01, high: 0.5}\nrank: {low: 1, high: 3}\ngamma: [0.1]\n")
    with pytest.raises(SpaceError, match=r"line 3: key 'gamma' appears twice \(first on line 1\)"):
        load_space(tmp_path / "dup.yaml")
    (tmp_path / "sci.yaml").write_text("gamma: {low: 1e-3, high: 5e-1, log: true}\n")
    assert load_space(tmp_path / "sci.yaml").to_dict()["params"]["gamma"]["low"] == 1e-3


@pytest.mark.parametrize("kw", [dict(dtype="bfloat16", prompt="fewshot", shots=3),
                                dict(prompt="tutor", system="Be brief.")])
def test_printed_confirmation_commands_parse_back_into_the_studys_settings(model, tok, tmp_path, kw):
    """Every setting that changes a number is in the printed commands (issue #30 item 1): a confirmation run
    exactly as printed runs in the study's regime (dtype, prompt, shots, system prompt, model)."""
    import shlex

    from vps.cli import build_parser

    out = tmp_path / "study"
    run(model, tok, out, train_file(tmp_path), 1, **kw)
    stored = json.loads((out / "tune.json").read_text())
    meta = json.loads((out / "best_trial.json").read_text())
    commands = meta["confirm"] + meta["confirm_grid"]
    assert len(commands) == 4
    for command in commands:
        words = shlex.split(command)
        assert words[0] == "vps"
        args = build_parser().parse_args(words[1:])
        assert args.model == stored["model"] and args.dtype == stored["dtype"], command
        assert args.prompt == stored["prompt"] and args.shots == stored["shots"], command
        assert args.system == stored["system"], command
        assert args.data == "gsm8k:test"
