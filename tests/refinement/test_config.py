"""RefineConfig (one validated set of refinement settings) and the loop's phases (issue #20, items 2 and 5)."""

import argparse
import math

import pytest

import vps
from tests.helpers.tiny_eval import tiny_model, tiny_tokenizer
from vps.prompting import chat_prompt
from vps.refinement import RefineConfig, TraceRow
from vps.refinement.config import RefineConfigError
from vps.refinement.loop import pick_references, refine, refine_many, score_candidate
from vps.refinement.samples import settings_fingerprint
from vps.verify import CompositeVerifier, extract_answer, parse_gold


@pytest.fixture
def setup():
    tok = tiny_tokenizer()
    model = vps.patch(tiny_model(tok), vps.VPSConfig(topk=8))
    return model, tok, chat_prompt(tok, "What is 3 + 4?", system=None)


def test_defaults_are_the_old_keyword_defaults():
    cfg = RefineConfig()
    assert (cfg.iters, cfg.mode, cfg.k_samples, cfg.max_new_tokens, cfg.seed, cfg.temperature, cfg.sampling) == (
        3, "self", 4, 256, 0, 0.7, "streams")
    assert not cfg.oracle and RefineConfig(mode="oracle").oracle
    assert vps.RefineConfig is RefineConfig and "RefineConfig" in vps.__all__


@pytest.mark.parametrize("changes, field", [
    (dict(iters=0), "iters"), (dict(iters=2.0), "iters"), (dict(iters=True), "iters"),
    (dict(mode="guess"), "mode"), (dict(k_samples=-1), "k_samples"), (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(seed="0"), "seed"), (dict(sampling="dice"), "sampling"), (dict(temperature=0.0), "temperature"),
    (dict(temperature=math.nan), "temperature"), (dict(temperature="hot"), "temperature"),
])
def test_an_invalid_value_is_refused_naming_its_field(changes, field):
    with pytest.raises(ValueError, match=field):
        RefineConfig(**changes)
    with pytest.raises(ValueError, match=field):
        RefineConfig().replace(**changes)


def test_without_samples_the_temperature_is_not_used_so_not_checked():
    assert RefineConfig(k_samples=0, temperature=0.0).temperature == 0.0


def test_frozen_and_replace_returns_a_validated_copy():
    cfg = RefineConfig()
    with pytest.raises(AttributeError):
        cfg.iters = 5  # type: ignore[misc]
    assert cfg.replace(iters=5) == RefineConfig(iters=5) and cfg.iters == 3
    with pytest.raises(TypeError, match="iterations"):
        cfg.replace(iterations=5)


def test_resolve_takes_the_old_keywords_over_a_config():
    assert RefineConfig.resolve() == RefineConfig()
    assert RefineConfig.resolve(iters=2, sample_temperature=0.5) == RefineConfig(iters=2, temperature=0.5)
    assert RefineConfig.resolve(RefineConfig(seed=3), k_samples=0) == RefineConfig(seed=3, k_samples=0)
    with pytest.raises(TypeError, match="same field"):
        RefineConfig.resolve(temperature=0.5, sample_temperature=0.6)
    with pytest.raises(TypeError, match="RefineConfig"):
        RefineConfig.resolve(3)  # type: ignore[arg-type]  # the old positional iters


def test_the_sample_fingerprint_is_unchanged():
    # Stored sample records are matched against these digests (computed before RefineConfig existed).
    assert settings_fingerprint(RefineConfig(), vps.VPSConfig()) == "c748cdc7d28cc9a9"
    old = RefineConfig(k_samples=3, max_new_tokens=16, temperature=0.5, seed=7, sampling="global")
    assert settings_fingerprint(old, None) == "8a07efc99e98c178"
    # refine-self and refine-oracle share samples: iters and mode are not part of it
    assert settings_fingerprint(old.replace(iters=9, mode="oracle"), None) == "8a07efc99e98c178"


def test_stop_strings_are_texts_and_join_the_fingerprint_only_when_given():
    assert RefineConfig(stop_strings=["\nQuestion:"]).stop_strings == ("\nQuestion:",)
    for bad in ([""], ["ok", 3], "\nQuestion:"):
        with pytest.raises(RefineConfigError, match="stop strings must be") as err:
            RefineConfig(stop_strings=bad)  # type: ignore[arg-type]
        assert err.value.field == "stop_strings"
    plain = RefineConfig(k_samples=3, max_new_tokens=16, temperature=0.5, seed=7, sampling="global")
    assert settings_fingerprint(plain.replace(stop_strings=()), None) == "8a07efc99e98c178"
    stopped = settings_fingerprint(plain.replace(stop_strings=("\nQuestion:",)), None)
    assert stopped != "8a07efc99e98c178"
    assert stopped != settings_fingerprint(plain.replace(stop_strings=("\n\nQ:",)), None)


def test_the_extraction_mode_is_checked_and_joins_the_fingerprint_unless_flexible():
    with pytest.raises(RefineConfigError, match="extract_mode must be one of") as err:
        RefineConfig(extract_mode="loose")
    assert err.value.field == "extract_mode"
    plain = RefineConfig(k_samples=3, max_new_tokens=16, temperature=0.5, seed=7, sampling="global")
    assert settings_fingerprint(plain.replace(extract_mode="flexible"), None) == "8a07efc99e98c178"
    strict, last = (settings_fingerprint(plain.replace(extract_mode=m), None) for m in ("strict", "last"))
    assert len({strict, last, "8a07efc99e98c178"}) == 3


def test_a_config_and_the_keywords_give_the_same_result(setup):
    model, tok, prompt = setup
    by_keywords = refine(model, tok, prompt, iters=2, k_samples=2, max_new_tokens=5, seed=1)
    by_config = refine(model, tok, prompt, config=RefineConfig(iters=2, k_samples=2, max_new_tokens=5, seed=1))

    def untimed(result):
        out = {k: v for k, v in result.to_dict().items() if k not in ("seconds", "trace", "sample_record")}
        out["trace"] = [{k: v for k, v in row.items() if k != "seconds"} for row in result.trace]
        out["sample_record"] = {k: v for k, v in result.sample_record.items() if k != "seconds"}
        return out

    assert untimed(by_keywords) == untimed(by_config)


def test_refine_many_refuses_a_bad_setting_naming_it(setup):
    model, tok, prompt = setup
    with pytest.raises(ValueError, match="max_new_tokens"):
        refine_many(model, tok, [prompt], max_new_tokens=0)
    with pytest.raises(TypeError, match="itres"):
        refine_many(model, tok, [prompt], itres=2)


def test_trace_row_keeps_the_row_layout():
    answer = extract_answer("#### 7")
    loss = {"total": math.nan, "components": {}, "no_evidence": True}
    first = TraceRow(iter=0, oracle=False, text="#### 7", answer=answer, tokens=3, entropy=0.5, loss=loss)
    assert list(first.to_dict()) == ["iter", "oracle", "text", "answer", "number", "tokens", "entropy", "loss",
                                     "policy", "mean_gain", "seconds"]
    assert first.total == math.inf  # a loss without evidence never counts as the best
    later = TraceRow(iter=1, oracle=True, text="", answer=None, tokens=0, entropy=0.0, loss=loss,
                     surrogate={"loss": 1.0}, improved=False)
    row = later.to_dict()
    assert list(row)[:4] == ["iter", "oracle", "surrogate", "improved"]
    assert row["answer"] is None and row["number"] is None and row["improved"] is False


def test_score_candidate_compares_with_the_previous_loss():
    verifier = CompositeVerifier()
    gold = parse_gold("#### 7")
    right = score_candidate(1, True, "#### 7", 4, 0.1, gold, [], verifier, {"loss": 0.3}, math.inf)
    assert right.improved is True and right.answer is not None and right.answer.text == "7"
    wrong = score_candidate(2, True, "#### 8", 4, 0.1, gold, [], verifier, {"loss": 0.3}, right.total)
    assert wrong.improved is False and wrong.total > right.total
    assert score_candidate(0, True, "#### 7", 4, 0.1, gold, [], verifier, None, math.inf).improved is None


def test_pick_references_oracle_gold_or_the_samples_majority():
    verifier = CompositeVerifier()
    seven, eight = extract_answer("#### 7"), extract_answer("#### 8")
    oracle = pick_references(RefineConfig(mode="oracle"), ["#### 5", parse_gold("#### 6")], [[], []], verifier)
    assert [r.text for r in oracle if r is not None] == ["5", "6"]
    own = pick_references(RefineConfig(), None, [[seven, eight, seven], [seven, eight], [seven]], verifier)
    assert own[0] is not None and own[0].text == "7"
    assert own[1] is None and own[2] is None  # no two samples agree, or one vote alone


def test_run_settings_build_one_refine_config(tmp_path):
    from tests.helpers.tiny_eval import settings_for, write_data

    _, settings = settings_for(write_data(tmp_path / "d.jsonl"), nll=False)
    cfg = settings.refine_config()
    assert (cfg.iters, cfg.k_samples, cfg.max_new_tokens, cfg.seed, cfg.sampling) == (
        settings.refine_iters, settings.refine_k_samples, settings.max_new_tokens, settings.seed, "streams")
    # the samples' own temperature, not the base methods' decoding temperature
    assert cfg.temperature == RefineConfig().temperature != settings.temperature
    assert settings.refine_config(mode="oracle", k_samples=8).oracle
    # the run's stop strings and extraction rule reach every sample and candidate
    assert cfg.stop_strings == tuple(settings.stop_strings) and cfg.extract_mode == settings.extract_mode
    _, strict = settings_for(write_data(tmp_path / "e.jsonl"), nll=False, extract_mode="strict", stop_strings=["##!"])
    assert (strict.refine_config().extract_mode, strict.refine_config().stop_strings) == ("strict", ("##!",))


def test_cli_refine_builds_its_config_from_the_flags():
    from vps.cli import build_parser
    from vps.commands.refine import check_args

    flags = ["--iters", "2", "--k-samples", "1", "--max-new-tokens", "9", "--seed", "4", "--sampling", "global"]
    args = build_parser().parse_args(["refine", "q", *flags])
    assert check_args(args) == RefineConfig(iters=2, k_samples=1, max_new_tokens=9, seed=4, sampling="global")
    args = build_parser().parse_args(["refine", "q", *flags, "--stop", "\nQ:", "--checkpoint-activations"])
    assert check_args(args) == RefineConfig(iters=2, k_samples=1, max_new_tokens=9, seed=4, sampling="global",
                                            stop_strings=("\nQ:",), checkpoint_activations=True)


# -- item 5: one of each rule ----------------------------------------------------------------------
def test_a_larger_rank_widens_topk_in_one_place():
    seed = vps.VPSConfig()
    assert seed.with_overrides(rank=40).topk == 40
    assert seed.with_overrides(rank=4).topk == seed.topk  # a rank within the pool leaves topk alone
    with pytest.raises(vps.ConfigError, match="topk"):
        seed.with_overrides(rank=40, topk=8)  # a topk given is kept, and refused when it cannot hold the rank
    assert vps.VPSConfig.pool_for(40, 32) == 40 and vps.VPSConfig.pool_for(2, 32) == 32

    from vps.bench.presets import make_config
    from vps.commands.common import add_config_arguments, config_from_args
    from vps.tuning.placement import trial_config

    p = argparse.ArgumentParser()
    add_config_arguments(p)
    assert config_from_args(p.parse_args(["--rank", "40"])).topk == 40
    assert make_config({"rank": 40}).topk == 40
    assert trial_config({"rank": 40}, placement=_AllPlacement()).config.topk == 40
    assert trial_config({"rank": 40, "topk": 8}, placement=_AllPlacement()).config.topk == 40  # drawn, widened


class _AllPlacement:
    def targets(self, modules):
        return None

    def layers(self, blocks):
        return None


def test_one_logits_to_keep_probe():
    from vps.kv_cache import logits_to_keep_kwargs

    tok = tiny_tokenizer()
    assert logits_to_keep_kwargs(tiny_model(tok), 3) == {"logits_to_keep": 3}

    class NoTrim(torch_nn_module()):
        def forward(self, input_ids):
            return input_ids

    assert logits_to_keep_kwargs(NoTrim(), 3) == {}


def torch_nn_module():
    import torch

    return torch.nn.Module


def test_one_gold_reader():
    from vps.evaluation.data import Item, gold_value, read_gold
    from vps.evaluation.methods.rows import gold as _gold

    assert read_gold("") is None and gold_value(None) is None
    assert gold_value(read_gold("#### 1,234")) == 1234.0 and gold_value(read_gold("#### six")) == "six"
    item = Item(id="a", question="q", answer="so #### 1,234", gold=1234.0, index=0)
    value, text, answer = _gold(item)
    assert (value, text) == (1234.0, "1,234") and answer == parse_gold("so #### 1,234")
    assert _gold(Item(id="b", question="q", answer="", gold=None, index=1)) == (None, None, None)


def test_cli_choices_come_from_the_library():
    from vps.commands.common import add_run_arguments
    from vps.commands.refine import add_arguments
    from vps.config import BUILDERS, DECODE_MODES
    from vps.prompting import PROMPT_STYLES
    from vps.refinement.config import MODES, SAMPLINGS
    from vps.verify import EXTRACT_MODES

    def choices(parser, dest):
        return next(a.choices for a in parser._actions if a.dest == dest)

    p = argparse.ArgumentParser()
    add_arguments(p)
    assert tuple(choices(p, "mode")) == MODES and tuple(choices(p, "sampling")) == SAMPLINGS
    assert tuple(choices(p, "builder")) == tuple(BUILDERS) and tuple(choices(p, "decode_mode")) == tuple(DECODE_MODES)
    run = argparse.ArgumentParser()
    add_run_arguments(run)
    assert tuple(choices(run, "prompt")) == PROMPT_STYLES and tuple(choices(run, "extract")) == EXTRACT_MODES


def test_eval_uses_the_shared_threads_flag():
    from vps.commands.common import check_threads
    from vps.commands.eval import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    assert p.parse_args(["--threads", "2"]).threads == 2
    with pytest.raises(ValueError, match="--threads must be in \\[1, 1024\\]"):
        check_threads(argparse.Namespace(threads=0))
