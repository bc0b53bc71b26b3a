"""VPS inside lm-evaluation-harness: the ``vps`` / ``vps-base`` model classes, the offline task
``gsm8k_local`` and ``vps lm-eval`` (tiny models built in code; one run on the real default model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

import vps  # noqa: E402
from tests.helpers.tiny_eval import QUESTIONS, tiny_model, tiny_tokenizer, write_data  # noqa: E402
from vps.cli import main  # noqa: E402
from vps.evaluation.nll import solution_nll  # noqa: E402
from vps.lmeval import TASKS_DIR, register  # noqa: E402
from vps.lmeval.cli import lm_eval_argv  # noqa: E402
from vps.lmeval.data import load_gsm8k  # noqa: E402
from vps.lmeval.model import VPSLM, VPSBaseLM, resolve_config  # noqa: E402
from vps.prompting import PromptFormat  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
TEST_QUESTIONS = [
    ("Ann has 2 dogs and gets 5 more. How many dogs?", "2 + 5 = 7\n#### 7"),
    ("A bag has 8 balls; 3 fall out. How many are left?", "8 - 3 = 5\n#### 5"),
    ("Bo reads 4 pages a day for 3 days. How many pages?", "4 * 3 = 12\n#### 12"),
]
PAIRS = [("Question: Tom has 3 apples.\nAnswer:", " 3 + 4 = 7"),
         ("Q: 6 pens?", " 12"),
         ("Sam had 10 cents and spent 4. What is left?\nAnswer:", " 10 - 4 = 6\n#### 6")]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture
def in_process_cli():
    """lm-eval's CLI configures its logger once per process, with a handler on the sys.stderr of that
    moment (a test's capture); undo that after a test that runs the CLI here, not in a subprocess."""
    import logging

    import lm_eval.utils

    logger = logging.getLogger("lm_eval")
    saved = (list(logger.handlers), logger.propagate, logger.level, lm_eval.utils._LOGGING_CONFIGURED)
    yield
    logger.handlers[:] = saved[0]
    logger.propagate, logger.level, lm_eval.utils._LOGGING_CONFIGURED = saved[1:]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama checkpoint directory, a VPS config file and GSM8K-style train/test files."""
    root = tmp_path_factory.mktemp("lm_eval")
    tok = tiny_tokenizer()
    model = tiny_model(tok)
    model.save_pretrained(root / "ckpt")
    tok.save_pretrained(root / "ckpt")
    cfg = vps.VPSConfig(gamma=0.5, adaptive_gamma=False)  # strong enough to change greedy text
    cfg.save(root / "cfg.json")
    data = root / "data" / "gsm8k"
    data.mkdir(parents=True)
    write_data(data / "train.jsonl")
    lines = [json.dumps({"question": q, "answer": a}) for q, a in TEST_QUESTIONS]
    (data / "test.jsonl").write_text("\n".join(lines) + "\n")
    return {"root": root, "ckpt": str(root / "ckpt"), "cfg": cfg, "cfg_path": str(root / "cfg.json"), "data": data}


@pytest.fixture(scope="module")
def patched_lm(tiny):
    return VPSLM(pretrained=tiny["ckpt"], vps_config=tiny["cfg_path"], device="cpu", batch_size=3)


def _loglikelihood(lm, pairs=PAIRS):
    return lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)],
                            disable_tqdm=True)


def _reference(tiny, cfg):
    model, tok = vps.load_model(tiny["ckpt"])
    if cfg is not None:
        vps.patch(model, cfg)
    return model, tok


def test_the_registry_resolves_vps_and_vps_base():
    from lm_eval.api.registry import get_model

    register()
    assert get_model("vps") is VPSLM and get_model("vps-base") is VPSBaseLM
    assert get_model("hf").__name__ == "HFLM"  # lm-eval's own models are still there


def test_vps_config_values():
    assert resolve_config(None) is None and resolve_config("none") is None and resolve_config("None") is None
    assert resolve_config("seed") == vps.VPSConfig()
    with pytest.raises(vps.ConfigError, match=r"^vps_config: config file /nope/best.json does not exist$"):
        resolve_config("/nope/best.json")
    with pytest.raises(vps.ConfigError, match="vps_config must be a VPSConfig JSON file"):
        resolve_config(3)


def test_patched_loglikelihood_is_vps_nll_with_prompt_selectors(tiny, patched_lm):
    assert vps.is_patched(patched_lm.model) and vps.get_config(patched_lm.model) == tiny["cfg"]
    got = _loglikelihood(patched_lm)
    model, tok = _reference(tiny, tiny["cfg"])
    ref = solution_nll(model, tok, [c for c, _ in PAIRS], [s for _, s in PAIRS])
    for (logp, _), r in zip(got, ref, strict=True):
        assert logp == pytest.approx(-r.nll * r.tokens, abs=1e-4)
    # a row's score does not depend on the rows batched with it (padding never reaches the selectors)
    single = VPSLM(pretrained=tiny["ckpt"], vps_config=tiny["cfg_path"], device="cpu", batch_size=1)
    for (a, _), (b, _) in zip(got, _loglikelihood(single), strict=True):
        assert a == pytest.approx(b, abs=1e-4)
    # and the patch is really on: the unpatched model scores differently
    base = _loglikelihood(VPSLM(pretrained=tiny["ckpt"], vps_config="none", device="cpu"))
    assert max(abs(a - b) for (a, _), (b, _) in zip(got, base, strict=True)) > 1e-3


def test_is_greedy_matches_patched_greedy_decoding(tiny, patched_lm):
    model, tok = _reference(tiny, tiny["cfg"])
    context = PAIRS[0][0]
    enc = tok([context], return_tensors="pt", add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    greedy = tok.decode(out[0, enc["input_ids"].shape[1]:])
    assert len(greedy) == 6, "the tiny model does not stop early here"
    (_, is_greedy), (_, other) = _loglikelihood(patched_lm, [(context, greedy), (context, greedy[:-1] + "#")])
    assert is_greedy and not other


def test_unpatched_equals_stock_hflm(tiny):
    from lm_eval.models.huggingface import HFLM

    stock = HFLM(pretrained=tiny["ckpt"], device="cpu", dtype="float32", batch_size=3)
    ours = VPSLM(pretrained=tiny["ckpt"], vps_config="none", device="cpu", batch_size=3)
    base = VPSBaseLM(pretrained=tiny["ckpt"], device="cpu", batch_size=3)
    assert not vps.is_patched(ours.model) and not vps.is_patched(base.model)
    want = _loglikelihood(stock)
    assert _loglikelihood(ours) == want and _loglikelihood(base) == want
    gen = [Instance("generate_until", {}, (c, {"until": ["QQQ"], "max_gen_toks": 5}), i)
           for i, (c, _) in enumerate(PAIRS)]
    assert ours.generate_until(gen, disable_tqdm=True) == stock.generate_until(gen, disable_tqdm=True)
    with pytest.raises(ValueError, match="^vps_config: --model vps-base is the unpatched model"):
        VPSBaseLM(pretrained=tiny["ckpt"], vps_config="seed")


def test_generate_until_is_patched_greedy_generate(tiny, patched_lm):
    model, tok = _reference(tiny, tiny["cfg"])
    plain, _ = _reference(tiny, None)
    requests = [Instance("generate_until", {}, (c, {"until": ["QQQ"], "max_gen_toks": 8}), i)
                for i, (c, _) in enumerate(PAIRS)]
    got = patched_lm.generate_until(requests, disable_tqdm=True)
    differs = False
    for (context, _), text in zip(PAIRS, got, strict=True):
        enc = tok([context], return_tensors="pt", add_special_tokens=False)
        outs = []
        for m in (model, plain):
            if vps.is_patched(m):
                vps.reset_state(m)
            ids = m.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
            outs.append(tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
        assert text == outs[0]
        differs |= outs[0] != outs[1]
    assert differs, "VPS changes at least one greedy continuation of the tiny model"


def test_loader_arguments_and_bad_values_are_refused(tiny):
    with pytest.raises(ValueError, match="^peft: not supported by --model vps"):
        VPSLM(pretrained=tiny["ckpt"], peft="adapter")
    with pytest.raises(ValueError, match="^dtype must be one of float32, bfloat16, float16, got 'auto'"):
        VPSLM(pretrained=tiny["ckpt"], dtype="auto")
    with pytest.raises(ValueError, match="^threads must be a whole number >= 1"):
        VPSLM(pretrained=tiny["ckpt"], threads=0)


def test_the_offline_task_reads_local_jsonl_with_our_fewshot_prompt(tiny, monkeypatch):
    from lm_eval.tasks import TaskManager

    data = load_gsm8k(gsm8k_test=tiny["data"] / "test.jsonl", gsm8k_train=tiny["data"] / "train.jsonl",
                      pretrained="ignored")
    assert data["test"]["question"] == [q for q, _ in TEST_QUESTIONS] and len(data["train"]) == len(QUESTIONS)
    with pytest.raises(FileNotFoundError, match="^gsm8k_test='/nope.jsonl': no such file"):
        load_gsm8k(gsm8k_test="/nope.jsonl")

    monkeypatch.setenv("VPS_DATA_DIR", str(tiny["data"].parent))
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    task = manager.load("gsm8k_local")["tasks"]["gsm8k_local"]
    docs = list(task.test_docs())
    assert [d["question"] for d in docs] == [q for q, _ in TEST_QUESTIONS]
    # lm-eval's prompt is vps eval's --prompt fewshot prompt: the first train items as shots, in order
    fmt = PromptFormat("fewshot", shots=tuple(QUESTIONS), n_shots=3)
    assert task.fewshot_context(docs[1], num_fewshot=3) == fmt.render(None, docs[1]["question"])
    assert task.config.generation_kwargs["until"] == ["\nQuestion:", "\n\nQ:"]


def test_argv_gets_the_bundled_task_path():
    assert lm_eval_argv(["--model", "vps"]) == ["--model", "vps", "--include_path", str(TASKS_DIR)]
    assert lm_eval_argv(["--help"]) == ["--help"] and lm_eval_argv([]) == []
    with pytest.warns(UserWarning, match="--include_path replaces the bundled task directory"):
        assert lm_eval_argv(["ls", "tasks", "--include_path", "/x"]) == ["ls", "tasks", "--include_path", "/x"]


def test_missing_lm_eval_is_one_line_naming_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    assert main(["lm-eval", "--model", "vps", "--tasks", "gsm8k_local"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["vps lm-eval: error: lm-eval is not installed; pip install vps[lm-eval]"]


def test_help_passes_through_to_lm_eval(capsys, in_process_cli):
    with pytest.raises(SystemExit) as exit_info:
        main(["lm-eval", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and out.startswith("vps lm-eval: ") and "usage: lm-eval" in out


def test_bad_vps_config_is_one_clear_line(tiny, capsys, in_process_cli):
    argv = ["lm-eval", "--model", "vps", "--model_args", f"pretrained={tiny['ckpt']},vps_config=/nope/best.json",
            "--tasks", "gsm8k_local", "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "vps lm-eval: error: vps_config: config file /nope/best.json does not exist\n" in err
    assert "Traceback" not in err


def _run_cli(args, cwd, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "vps.cli", "lm-eval", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **OFFLINE, **(env or {})})


def _results(out: Path) -> dict:
    files = sorted(out.rglob("results_*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


def _samples(out: Path) -> list[dict]:
    """The logged samples, one per document (lm-eval logs one line per document and filter)."""
    lines = [json.loads(line) for f in out.rglob("samples_gsm8k_local_*.jsonl") for line in f.read_text().splitlines()]
    return [s for s in lines if s["filter"] == "strict-match"]


def test_cli_runs_the_offline_task_with_vps_on(tiny):
    out = tiny["root"] / "out"
    proc = _run_cli(["--model", "vps", "--model_args", f"pretrained={tiny['ckpt']},vps_config={tiny['cfg_path']}",
                     "--tasks", "gsm8k_local", "--limit", "2", "--num_fewshot", "2", "--batch_size", "2",
                     "--gen_kwargs", "max_gen_toks=6", "--device", "cpu", "--output_path", str(out), "--log_samples"],
                    cwd=tiny["root"], env={"VPS_DATA_DIR": str(tiny["data"].parent)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = _results(out)
    metrics = results["results"]["gsm8k_local"]
    assert "exact_match,strict-match" in metrics and "exact_match,flexible-extract" in metrics
    assert results["config"]["model"] == "vps" and results["config"]["vps_config"] == tiny["cfg"].to_dict()
    samples = sorted(_samples(out), key=lambda s: s["doc_id"])
    assert [s["doc"]["question"] for s in samples] == [q for q, _ in TEST_QUESTIONS[:2]]


@pytest.mark.real_model
def test_real_default_model_through_lm_eval(tmp_path):
    out = tmp_path / "out"
    proc = _run_cli(["--model", "vps", "--model_args", "pretrained=smollm2-135m", "--tasks", "gsm8k_local",
                     "--limit", "4", "--batch_size", "4", "--gen_kwargs", "max_gen_toks=16", "--device", "cpu",
                     "--output_path", str(out), "--log_samples"], cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = _results(out)
    config = results["config"]
    assert config["vps_model"] == "smollm2-135m" and config["vps_config"] == vps.VPSConfig().to_dict()
    assert results["n-samples"]["gsm8k_local"]["effective"] == 4
    samples = _samples(out)
    # greedy SmolLM2 answers the third item with EOS at once (so does `vps eval` on the same prompt)
    assert len(samples) == 4 and sum(bool(s["resps"][0][0].strip()) for s in samples) >= 3


def test_evaluate_from_python_is_one_call(tiny, monkeypatch, in_process_cli):
    """`vps.lmeval.evaluate` is lm-eval's simple_evaluate with `vps` registered and gsm8k_local found, both
    of which plain ``simple_evaluate(model="vps", tasks=["gsm8k_local"])`` lacks."""
    import vps.lmeval

    monkeypatch.setenv("VPS_DATA_DIR", str(tiny["data"].parent))
    out = vps.lmeval.evaluate(model="vps", model_args={"pretrained": tiny["ckpt"], "vps_config": tiny["cfg_path"]},
                              tasks="gsm8k_local", limit=2, num_fewshot=2, batch_size=2,
                              gen_kwargs={"max_gen_toks": 6}, device="cpu")
    metrics = out["results"]["gsm8k_local"]
    assert "exact_match,strict-match" in metrics and out["n-samples"]["gsm8k_local"]["effective"] == 2
    assert out["config"]["vps_config"] == tiny["cfg"].to_dict()
    samples = sorted((s for s in out["samples"]["gsm8k_local"] if s["filter"] == "strict-match"),
                     key=lambda s: s["doc_id"])
    assert [s["doc"]["question"] for s in samples] == [q for q, _ in TEST_QUESTIONS[:2]]


def test_task_manager_finds_the_bundled_task_and_registers_the_models(tmp_path):
    from lm_eval.api.registry import get_model

    import vps.lmeval

    manager = vps.lmeval.task_manager(include_path=tmp_path, include_defaults=False)
    assert "gsm8k_local" in manager.all_tasks and get_model("vps") is VPSLM
    assert manager.include_path == [str(TASKS_DIR), str(tmp_path)]  # the bundled folder first, then the caller's


def test_the_python_route_without_lm_eval_names_the_extra(monkeypatch):
    import vps.lmeval

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    for call in (vps.lmeval.register, vps.lmeval.task_manager, vps.lmeval.evaluate):
        with pytest.raises(ImportError, match=r"^lm-eval is not installed; pip install vps\[lm-eval\]$"):
            call()
