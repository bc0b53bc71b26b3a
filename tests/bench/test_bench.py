"""`vps bench` end to end on a tiny Llama built in code (tiny sizes; no timing assertions)."""

import json
import math

import pytest
import torch

import vps
from tests.helpers.tiny import VOCAB, tiny_llama
from vps.bench import (
    DEFAULT_CONFIGS,
    TARGET_DECODE_B1,
    TARGET_MEMORY,
    TARGET_PREFILL_BATCH,
    TARGET_PREFILL_LONG,
    BenchSettings,
    format_report,
    parse_config_spec,
    resolve_configs,
    run_benchmark,
)
from vps.cli import main


def tiny_settings(**kw):
    return BenchSettings.quick_settings(prefill_repeats=2, decode_repeats=1, warmup=1, **kw)


def check_timing_fields(result, names):
    keys = ["prefill_1x32", "prefill_2x16", "decode_b1", "decode_b2", "generate_b1", "generate_b2"]
    assert [w["key"] for w in result["workloads"]] == keys
    assert set(result["configs"]) == set(names)
    for key in keys:
        base = result["base"]["workloads"][key]
        assert base["median_s"] > 0 and base["min_s"] <= base["median_s"] <= base["max_s"]
    for entry in result["configs"].values():
        for key in keys:
            s = entry["workloads"][key]
            assert math.isfinite(s["ratio"]) and s["ratio"] > 0
            assert math.isfinite(s["paired_ratio"]) and s["paired_ratio"] > 0
            assert s["ratio"] == pytest.approx(s["median_s"] / result["base"]["workloads"][key]["median_s"])
            assert (s["pass"] is None) == (s["target"] is None)
        assert entry["workloads"]["decode_b1"]["tokens_per_s"] > 0
        assert entry["workloads"]["generate_b1"]["tokens_per_s"] > 0
    m = result["machine"]
    assert m["threads"] >= 1 and m["torch"] == torch.__version__
    assert "loadavg_start" in m and "loadavg_end" in m and result["wall_s"] > 0


def test_run_benchmark_in_memory_model(one_thread):
    model = tiny_llama()
    before = {n: m for n, m in model.named_modules()}
    # a measurement (not --quick) at tiny sizes: targets follow the workload roles, not the sizes
    result = run_benchmark(model, "sk,sk-dynamic", tiny_settings(quick=False), progress=False)
    check_timing_fields(result, ["sk", "sk-dynamic"])
    sk, dyn = result["configs"]["sk"], result["configs"]["sk-dynamic"]
    # the decode target is for frozen decoding only
    assert sk["workloads"]["prefill_1x32"]["target"] == TARGET_PREFILL_LONG
    assert sk["workloads"]["prefill_2x16"]["target"] == TARGET_PREFILL_BATCH
    assert sk["workloads"]["decode_b1"]["target"] == TARGET_DECODE_B1
    assert sk["workloads"]["generate_b1"]["target"] == TARGET_DECODE_B1
    assert sk["workloads"]["generate_b2"]["target"] is None
    assert dyn["workloads"]["decode_b1"]["target"] is None and dyn["config"]["decode_mode"] == "dynamic"
    assert sk["config"]["builder"] == "sk" and sk["config"]["rank"] == 2
    # a model built in code cannot be reloaded in a subprocess: CPU memory is skipped, and says why
    assert result["memory_method"] is None and "model_spec" in result["memory_skipped"]
    # the model is handed back unpatched, with its original modules
    assert not vps.is_patched(model)
    assert all(before[n] is m for n, m in model.named_modules())
    json.dumps(result)  # JSON-ready
    report = format_report(result)
    for text in ("sk-dynamic", "target", "prefill 2x16", "decode b1", "generate() b1", "load average", "same process"):
        assert text in report


def test_floor_reuses_the_plans_of_an_untimed_run(one_thread, monkeypatch):
    from vps import layer as layer_mod

    builds = {"n": 0}
    original = layer_mod.VPSLinear._build_plan

    def counting(self, *args, **kwargs):
        builds["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(layer_mod.VPSLinear, "_build_plan", counting)
    model = tiny_llama()
    counts = {}
    for name in ("sk", "floor"):
        builds["n"] = 0
        result = run_benchmark(model, name, tiny_settings(), progress=False)
        counts[name] = builds["n"]
    check_timing_fields(result, ["floor"])
    entry = result["configs"]["floor"]
    assert entry["plan_reuse"] and entry["config"]["builder"] == "sk" and entry["memory"] is None
    assert all(s["target"] is None and s["pass"] is None for s in entry["workloads"].values())
    # every floor run builds its plans once (the untimed run); the timed run only reuses them
    assert counts["floor"] == counts["sk"] > 0
    assert "the rank-2 term alone" in format_report(result)
    assert not vps.is_patched(model)


def test_run_benchmark_refuses_a_patched_model():
    model = vps.patch(tiny_llama(), vps.VPSConfig(topk=8))
    with pytest.raises(ValueError, match="unpatched"):
        run_benchmark(model, "sk", tiny_settings(), progress=False)


def save_tiny_checkpoint(path):
    """A tiny Llama plus a word-level tokenizer, loadable by `vps.load_model` (and so by a subprocess)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    tiny_llama().save_pretrained(path)
    tok = Tokenizer(WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w3"))
    tok.pre_tokenizer = WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w3", pad_token="w0", eos_token="w1",
                            bos_token="w2").save_pretrained(path)


def test_cli_end_to_end_with_memory_probes(tmp_path, capsys):
    ckpt = tmp_path / "tiny"
    save_tiny_checkpoint(ckpt)
    out = tmp_path / "bench.json"
    rc = main(["bench", "--model", str(ckpt), "--quick", "--configs", "sk", "--repeats", "1", "--threads", "1",
               "--json", "--out", str(out), "--no-progress", "--plot", str(tmp_path / "bench.png")])
    assert rc == 0
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
    result = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == result
    check_timing_fields(result, ["sk"])
    assert result["settings"]["prefill_repeats"] == result["settings"]["decode_repeats"] == 1
    base_mem, mem = result["base"]["memory"], result["configs"]["sk"]["memory"]
    assert "peak RSS" in result["memory_method"] and result["memory_error"] is None
    assert base_mem["peak_mb"] > 0 and mem["peak_mb"] > 0
    assert mem["ratio"] == pytest.approx(mem["peak_mb"] / base_mem["peak_mb"])
    assert 0.5 < mem["ratio"] < 2
    assert mem["target"] is None and mem["pass"] is None, "--quick is a smoke test: no memory target either"
    assert result["model"]["name"] == str(ckpt)
    from PIL import Image

    assert Image.open(tmp_path / "bench.png").size[0] < 1200, "7 panels in a grid, not a strip"


def test_quick_runs_have_no_targets_and_the_table_fits_120_columns(one_thread):
    settings = tiny_settings()
    assert settings.quick and settings.memory_target is None
    assert all(w.target is None for w in settings.workloads())
    assert BenchSettings().memory_target == TARGET_MEMORY
    assert [w.target for w in BenchSettings().workloads()] == [TARGET_PREFILL_LONG, TARGET_PREFILL_BATCH,
                                                               TARGET_DECODE_B1, None, TARGET_DECODE_B1, None]
    result = run_benchmark(tiny_llama(), "sk,hybrid,sk-dynamic", settings, progress=False)
    assert all(s["target"] is None and s["pass"] is None
               for e in result["configs"].values() for s in e["workloads"].values())
    report = format_report(result)
    assert "PASS" not in report and "FAIL" not in report and "\ntarget " not in report
    assert "--quick: a smoke test at tiny sizes, not a measurement: no target applies" in report
    table = [line for line in report.splitlines() if " | " in line or line.startswith("---")]
    assert max(map(len, table)) <= 120 and sum(line.startswith("config ") for line in table) == 2, table
    for label in ("prefill 1x32", "prefill 2x16", "decode b1", "decode b2", "generate() b1", "generate() b2"):
        assert sum(label in line for line in table) == 1, "every column once, in one of the blocks"
    assert sum(line.startswith("sk-dynamic ") for line in table) == 2, "every block has every config's row"


@pytest.mark.parametrize("spec, expected", [
    ("sk", {"builder": "sk"}),
    ("sc", {"builder": "sc"}),
    ("hybrid", {"builder": "hybrid"}),
    ("sk-dynamic", {"builder": "sk", "decode_mode": "dynamic"}),
    ("sk:rank=4:adaptive_rank=false", {"builder": "sk", "rank": 4, "adaptive_rank": False}),
    ("sc:gamma=0.25:scope=batch", {"builder": "sc", "gamma": 0.25, "scope": "batch"}),
])
def test_parse_config_spec(spec, expected):
    name, overrides = parse_config_spec(spec)
    assert name == spec and overrides == expected


@pytest.mark.parametrize("specs, message", [
    ("bogus", "unknown bench config 'bogus'"),
    ("sk:rank", "bad override 'rank'"),
    ("sk:no_such_field=1", "no_such_field"),
    ("sk:rank=0", "rank"),
])
def test_bad_configs_are_named(specs, message):
    with pytest.raises(ValueError, match=message):
        resolve_configs(specs)


def test_default_configs_and_sizes():
    assert list(resolve_configs(None)) == list(DEFAULT_CONFIGS) == ["sk", "sc", "hybrid", "sk-dynamic", "floor"]
    s = BenchSettings()
    assert s.prefill_shapes == [(1, 512), (8, 128)] and s.decode_batches == [1, 8]
    assert (s.prompt_tokens, s.new_tokens, s.prefill_repeats, s.decode_repeats) == (32, 64, 5, 3)
    assert [w.key for w in s.workloads()] == ["prefill_1x512", "prefill_8x128", "decode_b1", "decode_b8",
                                              "generate_b1", "generate_b8"]
    assert [w.key for w in BenchSettings(kinds=("generate",)).workloads()] == ["generate_b1", "generate_b8"]
    with pytest.raises(ValueError, match="new_tokens"):
        BenchSettings(new_tokens=0).validate()
    with pytest.raises(ValueError, match="workload kinds"):
        BenchSettings(kinds=("decode", "beam")).validate()


def test_generate_workload_makes_exactly_the_asked_tokens(one_thread):
    from vps.bench import make_inputs, time_generate

    model = tiny_llama()
    model.generation_config.eos_token_id = 1
    ids, mask = make_inputs(model, 2, 8, 0)
    calls = []
    original = model.generate
    model.generate = lambda **kw: calls.append(kw) or original(**kw)
    assert time_generate(model, ids, mask, 6) > 0
    assert calls[0]["min_new_tokens"] == calls[0]["max_new_tokens"] == 6 and calls[0]["do_sample"] is False


def test_profile_splits_the_forward_into_vps_parts(one_thread):
    from vps import activation_stats as stats_mod
    from vps import layer as layer_mod
    from vps.bench.profiling import profile_patched

    model = tiny_llama()
    originals = (layer_mod.VPSLinear._build_plan, layer_mod.VPSLinear._apply, stats_mod.output_scores)
    text = profile_patched(model, {"builder": "sk"}, tiny_settings(), row_limit=5)
    assert "patched prefill 2x16: VPS parts" in text and "patched decode step, batch 1: VPS parts" in text
    prefill = text.split("=== patched prefill 2x16: torch ops")[0]
    ms = {ln.split(":")[0].strip(): float(ln.split(":")[1].split("ms")[0]) for ln in prefill.splitlines()
          if " ms" in ln}
    whole, stats = ms["whole forward"], ms["of which statistics"]
    plan = ms["plan building (selection, policy, clip, Q)"]
    assert 0 < stats < plan < whole and ms["applying the perturbation"] > 0
    # a decode step in frozen mode reuses the plans: no plan building at all
    decode = text.split("=== patched decode step, batch 1: VPS parts")[1].split("\n===")[0]
    assert "plan building (selection, policy, clip, Q): 0.0 ms" in decode
    assert not vps.is_patched(model)
    assert (layer_mod.VPSLinear._build_plan, layer_mod.VPSLinear._apply, stats_mod.output_scores) == originals


def test_plot_of_a_result_and_from_its_json(tmp_path, one_thread):
    from vps.bench.plot import main as plot_main
    from vps.bench.plot import plot_benchmark

    result = run_benchmark(tiny_llama(), "sk,floor", tiny_settings(), progress=False)
    png = plot_benchmark(result, tmp_path / "a" / "bench.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    from PIL import Image

    width, height = Image.open(png).size
    assert width < 1000 and height > 600, "6 panels as 2 rows of 3"
    saved = tmp_path / "run.json"
    saved.write_text(json.dumps(result))
    assert plot_main([str(saved)]) == 0 and saved.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "bad.json").write_text('{"configs": {}}')
    assert plot_main([str(tmp_path / "bad.json")]) == 2
    assert plot_main([str(tmp_path / "missing.json")]) == 2
    with pytest.raises(ValueError, match="no configuration"):
        plot_benchmark(dict(result, configs={}), tmp_path / "empty.png")


def test_compiled_benchmark_compiles_each_variant_once(one_thread, monkeypatch):
    """--compile: base and config each on its own compiled copy; the warm-up compiles and the timed
    rounds, which alternate the variants, never recompile (dynamo's eager backend stands in for
    inductor to keep this fast; tests/core/test_compile.py runs inductor itself)."""
    import functools

    from vps.compiling import compiled_graphs

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    model = tiny_llama()
    calls, cold_during = [], []
    import vps.bench.runner as runner

    real = runner._time_workload

    def spy(variants, w, settings, load_samples):
        cold_during.append(torch._inductor.config.force_disable_caches)
        out = real(variants, w, settings, load_samples)
        calls.append(compiled_graphs())
        return out

    monkeypatch.setattr(runner, "_time_workload", spy)
    caches_before = torch._inductor.config.force_disable_caches
    settings = tiny_settings(kinds=("prefill",), compile="default", memory=False)
    result = run_benchmark(model, "sk", settings, progress=False)
    assert result["compile"]["mode"] == "default" and result["compile"]["fullgraph"]
    # two variants x two prefill shapes, each compiled in its warm-up round and nothing after (the patched
    # copy may compile once more in its first warm-up where its first forward, without a plan yet, traces
    # differently from the next)
    assert result["compile"]["graphs"] in (4, 5) and calls[-1] - calls[0] == 2
    assert not vps.is_patched(model), "the caller's model is left as it was"
    report = format_report(result)
    assert "compiled: base and every config" in report
    comp = result["compile"]
    assert comp["base_compile_s"] > 0 and comp["configs"]["sk"]["compile_s"] > 0
    assert comp["configs"]["sk"]["ratio"] == pytest.approx(comp["configs"]["sk"]["compile_s"] / comp["base_compile_s"])
    assert comp["timed_base_compile_s"] == 0 and comp["configs"]["sk"]["timed_compile_s"] == 0
    line = next(ln for ln in report.splitlines() if ln.startswith("compile time"))
    assert f"base {comp['base_compile_s']:.1f} s" in line and f"({comp['configs']['sk']['ratio']:.2f}x)" in line
    # Cold compiles, so the ratio is not a cache hit against a fresh compile; the switch is put back.
    assert comp["cold"] is True and "cold, caches off" in line and all(cold_during)
    assert torch._inductor.config.force_disable_caches is caches_before
    assert "timed rounds compiled nothing" in report
    entry = result["configs"]["sk"]["workloads"]["prefill_1x32"]
    assert math.isfinite(entry["ratio"]) and entry["ratio"] > 0


def test_compiled_warm_up_lasts_until_nothing_compiles(one_thread, monkeypatch):
    """One prefill shape: the warm-up repeats a call until it compiles nothing, so any compilation counts as
    compile time and no timed round includes it; the timed figures and tokens/s exclude compile time."""
    import functools

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    settings = tiny_settings(kinds=("prefill", "decode"), prefill_shapes=[(1, 32)], decode_batches=[1],
                             compile="default", memory=False)
    result = run_benchmark(tiny_llama(), "sk", settings, progress=False)
    comp = result["compile"]
    assert comp["timed_base_compile_s"] == 0 and comp["configs"]["sk"]["timed_compile_s"] == 0
    assert comp["configs"]["sk"]["compile_s"] > 0 and comp["base_compile_s"] > 0
    report = format_report(result)
    assert "WARNING: compilation inside timed rounds" not in report
    assert "decode b1 tokens/s: base" in report and ", sk " in report


def test_static_cache_decode_sees_the_same_logits_as_the_dynamic_one(one_thread, monkeypatch):
    """Compiled runs decode into a StaticCache: the steps must compute what the dynamic cache computes."""
    import vps.bench.timing as timing
    from tests.helpers.tiny import ids

    model = vps.patch(tiny_llama(), vps.VPSConfig())
    x = ids(2, 8)
    real = timing.output_cache
    logits = {}
    for static in (False, True):
        seen = []

        def spy(out, seen=seen):
            seen.append(out.logits[:, -1].clone())
            return real(out)

        monkeypatch.setattr(timing, "output_cache", spy)
        assert timing.time_decode(model, x, torch.ones_like(x), 5, static) > 0
        logits[static] = torch.stack(seen)
    assert logits[True].shape[0] == 6  # the prefill and 5 steps
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-5, atol=1e-5)
