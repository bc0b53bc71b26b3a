"""The refinement loop on a tiny model with a character tokenizer (and briefly on the real model)."""

import json

import pytest
import torch

import vps
from tests.helpers.tiny_eval import stop_inside, tiny_model, tiny_tokenizer
from vps.prompting import chat_prompt
from vps.refinement.loop import refine


@pytest.fixture
def setup():
    tok = tiny_tokenizer()
    model = vps.patch(tiny_model(tok), vps.VPSConfig(topk=8))
    return model, tok, chat_prompt(tok, "What is 3 + 4?", system=None)


def test_self_mode_trace_and_adaptation(setup):
    _, tok, prompt = setup
    # A fixed, large gamma and step scale make the tiny model's gain steps visible in float32.
    model = vps.patch(tiny_model(tok), vps.VPSConfig(topk=8, gamma=0.9, adaptive_gamma=False, lbfgs_scale=1.0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = refine(model, tok, prompt, iters=3, k_samples=3, max_new_tokens=8, seed=1)
    assert not result.oracle and result.mode == "self"
    assert len(result.trace) == 3 and 0 <= result.best_index < 3
    first, later = result.trace[0], result.trace[1:]
    assert first["policy"]["builders"] == {"sk": first["policy"]["layers"]}
    for row in later:
        assert row["policy"]["builders"].get("sc", 0) > 0, "a captured gradient switches Hybrid to SC"
        assert row["surrogate"]["lbfgs_pairs"] >= 0 and "improved" in row
        assert row["surrogate"]["target"] in ("answer", "prompt")
    assert result.trace[2]["mean_gain"] != 1.0, "the gains moved"
    assert result.trace[1]["policy"]["sigma"] != first["policy"]["sigma"], "entropy feedback changes sigma"
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)
    assert len(result.samples) == 3
    json.dumps(result.to_dict())  # the trace is JSON-ready


def test_oracle_mode_is_labelled_and_uses_gold(setup):
    model, tok, prompt = setup
    result = refine(model, tok, prompt, gold="#### 7", mode="oracle", iters=2, k_samples=0, max_new_tokens=6)
    assert result.oracle and result.reference == "7"
    assert all(row["oracle"] for row in result.trace)
    assert result.trace[1]["surrogate"]["target"] == "answer"
    assert result.to_dict()["oracle"] is True


def test_without_reference_the_surrogate_uses_the_prompt(setup):
    model, tok, prompt = setup
    result = refine(model, tok, prompt, iters=2, k_samples=0, max_new_tokens=4)
    assert result.reference is None
    assert result.trace[1]["surrogate"]["target"] == "prompt"


@pytest.mark.parametrize("kwargs,match", [
    (dict(mode="oracle"), "gold"), (dict(mode="guess"), "mode"), (dict(iters=0), "iters"),
    (dict(k_samples=-1), "k_samples"), (dict(sampling="dice"), "sampling"),
    (dict(sample_temperature=0.0), "sample_temperature"),
])
def test_bad_arguments(setup, kwargs, match):
    model, tok, prompt = setup
    with pytest.raises(ValueError, match=match):
        refine(model, tok, prompt, **kwargs)


def test_unpatched_model_is_refused():
    with pytest.raises(ValueError, match="patched"):
        refine(tiny_model(tiny_tokenizer()), tiny_tokenizer(), "q")


def test_decode_returns_the_first_steps_logits_without_keeping_every_steps(setup):
    from vps.refinement.loop import _decode

    model, tok, prompt = setup
    texts, counts, first = _decode(model, tok, [prompt, prompt + " 1"], max_new_tokens=5, temperature=0.0)
    assert len(texts) == 2 and all(0 < n <= 5 for n in counts)
    vps.reset_state(model)
    enc = vps.prompting.encode(tok, [prompt, prompt + " 1"])
    with torch.no_grad():
        direct = model(**enc).logits[:, -1].float()
    assert first.shape == direct.shape and torch.allclose(first, direct, atol=1e-5)


def test_stream_sampler_draws_from_the_tempered_softmax_and_keeps_each_groups_stream():
    from vps.refinement.samples import StreamSampler

    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -30.0])
    temperature, draws = 0.7, 20000
    # two groups of two rows; every step each row draws one token
    sampler = StreamSampler(groups=2, group_size=2, temperature=temperature, seed=3)
    picks = torch.stack([sampler(None, logits.repeat(4, 1)).argmax(-1) for _ in range(draws // 4)]).flatten()
    freq = torch.bincount(picks, minlength=5).double() / picks.numel()
    expected = torch.softmax(logits.double() / temperature, -1)
    assert torch.allclose(freq, expected, atol=0.012), (freq, expected)
    assert freq[4] == 0.0
    # a group's draws are those of a lone sampler with the same seed, whatever the other group does
    together = StreamSampler(groups=2, group_size=2, temperature=temperature, seed=3)
    alone = StreamSampler(groups=1, group_size=2, temperature=temperature, seed=3)
    other_logits = torch.randn(2, 5)
    for _ in range(5):
        both = together(None, torch.cat([other_logits, logits.repeat(2, 1)]))
        assert torch.equal(both[2:], alone(None, logits.repeat(2, 1)))
    assert not torch.equal(both[0], both[1]), "rows within a group draw different noise"
    with pytest.raises(ValueError, match="built for 4 rows"):
        sampler(None, logits.repeat(3, 1))
    with pytest.raises(ValueError, match="temperature"):
        StreamSampler(1, 1, 0.0, 0)


def test_global_sampling_draws_one_prompt_at_a_time_from_the_global_generator(setup):
    model, tok, _ = setup
    prompt = chat_prompt(tok, "What is 12 - 5 + 2?", system=None)
    kw = dict(iters=1, k_samples=4, max_new_tokens=8, seed=1)
    first = refine(model, tok, prompt, sampling="global", **kw)
    assert sum(s is not None for s in first.samples) >= 2, "the comparison needs answers to compare"
    assert refine(model, tok, prompt, sampling="global", **kw).samples == first.samples
    from vps.patching import reset_state
    from vps.prompting import generate_texts
    from vps.verify import extract_answer

    reset_state(model)
    texts, _ = generate_texts(model, tok, [prompt] * 4, max_new_tokens=8, temperature=0.7, seed=1)
    assert first.samples == [None if (a := extract_answer(t)) is None else a.text for t in texts]
    # torch.multinomial draws one sample by the same exponential race from the same generator, so a
    # lone prompt's streams draws are the global ones: "streams" reproduces runs made with "global"
    assert refine(model, tok, prompt, sampling="streams", **kw).samples == first.samples


@pytest.mark.parametrize("mode", ["self", "oracle"])
def test_refine_many_equals_one_refine_per_prompt(mode):
    from vps.refinement.loop import refine_many

    tok = tiny_tokenizer()
    # Large, fixed gamma and step scale: the gains, the history rule and SC all visibly act.
    cfg = vps.VPSConfig(topk=8, gamma=0.9, adaptive_gamma=False, lbfgs_scale=1.0)
    model = vps.patch(tiny_model(tok), cfg)
    questions = ["What is 3 + 4?", "What is 12 - 5 + 2?", "Add 1 and 1."]  # different lengths: padding
    prompts = [chat_prompt(tok, q, system=None) for q in questions]
    golds = ["#### 7", "#### 9", "#### 2"] if mode == "oracle" else None
    kw = dict(iters=4, mode=mode, k_samples=3, max_new_tokens=8, seed=1)  # 4: the history rule can act
    together = refine_many(model, tok, prompts, golds, **kw)
    alone = [refine(model, tok, p, gold=None if golds is None else golds[i], **kw) for i, p in enumerate(prompts)]
    assert len(together) == 3
    assert sum(s is not None for t in together for s in t.samples) >= 3, "samples with answers to compare"
    for t, a in zip(together, alone, strict=True):
        assert t.samples == a.samples and t.reference == a.reference and t.best_index == a.best_index
        assert [r["text"] for r in t.trace] == [r["text"] for r in a.trace]
        for rt, ra in zip(t.trace[1:], a.trace[1:], strict=True):
            assert rt["improved"] == ra["improved"] and rt["surrogate"]["target"] == ra["surrogate"]["target"]
            assert rt["surrogate"]["loss"] == pytest.approx(ra["surrogate"]["loss"], rel=1e-4)
            assert rt["mean_gain"] == pytest.approx(ra["mean_gain"], rel=1e-4)
            assert rt["policy"]["sigma"] == pytest.approx(ra["policy"]["sigma"], rel=1e-4)
        assert t.trace[3]["mean_gain"] != 1.0
    # every prompt kept its own gains: they differ between prompts
    assert len({round(t.trace[3]["mean_gain"], 6) for t in together}) > 1


def test_a_sample_cache_reuses_samples_drawn_with_the_same_settings_only():
    from vps.refinement.loop import refine_many
    from vps.refinement.samples import SampleCache

    tok = tiny_tokenizer()
    model = vps.patch(tiny_model(tok), vps.VPSConfig(topk=8))
    prompts = [chat_prompt(tok, q, system=None) for q in ("What is 12 - 5 + 2?", "What is 3 + 4?")]
    kw = dict(iters=2, k_samples=3, max_new_tokens=8, seed=1)
    cache = SampleCache()
    first = refine_many(model, tok, prompts, sample_cache=cache, **kw)
    assert len(cache) == 2 and not any(r.samples_reused for r in first)
    # the oracle mode reuses them; its results equal those of a call that draws its own
    golds = ["#### 9", "#### 7"]
    reused = refine_many(model, tok, prompts, golds, mode="oracle", sample_cache=cache, **kw)
    fresh = refine_many(model, tok, prompts, golds, mode="oracle", **kw)
    for r, f, a in zip(reused, fresh, first, strict=True):
        assert r.samples_reused and r.reused_seconds > 0 and not f.samples_reused and f.reused_seconds == 0
        assert r.samples == f.samples == a.samples and r.tokens == f.tokens
        assert [t["text"] for t in r.trace] == [t["text"] for t in f.trace]
    # another seed, another prompt or another configuration draws anew
    assert not any(r.samples_reused for r in refine_many(model, tok, prompts, sample_cache=cache, **{**kw, "seed": 2}))
    mixed = refine_many(model, tok, [prompts[0], "user: 1 + 1?\nassistant:"], sample_cache=cache, **kw)
    assert [r.samples_reused for r in mixed] == [True, False]
    other = vps.patch(tiny_model(tok), vps.VPSConfig(topk=8, rank=1))
    assert not any(r.samples_reused for r in refine_many(other, tok, prompts, sample_cache=cache, **kw))
    # sets drawn with other settings are kept beside the first ones: more sets than prompts
    assert len(cache) > cache.prompts == 3


def test_a_results_sample_record_restores_its_samples_in_a_new_cache():
    from vps.refinement.loop import refine_many
    from vps.refinement.samples import SampleCache

    tok = tiny_tokenizer()
    model = vps.patch(tiny_model(tok), vps.VPSConfig(topk=8))
    prompts = [chat_prompt(tok, q, system=None) for q in ("What is 12 - 5 + 2?", "What is 3 + 4?")]
    kw = dict(iters=2, k_samples=3, max_new_tokens=8, seed=1)
    first = refine_many(model, tok, prompts, **kw)
    records = [json.loads(json.dumps(r.to_dict()))["sample_record"] for r in first]  # as a row stores it
    cache = SampleCache()
    for p, rec in zip(prompts, records, strict=True):
        cache.restore(p, rec)
    golds = ["#### 9", "#### 7"]
    restored = refine_many(model, tok, prompts, golds, mode="oracle", sample_cache=cache, **kw)
    fresh = refine_many(model, tok, prompts, golds, mode="oracle", **kw)
    for r, f, rec in zip(restored, fresh, records, strict=True):
        assert r.samples_reused and r.reused_seconds == rec["seconds"] and not f.samples_reused
        assert r.samples == f.samples and r.tokens == f.tokens and r.sample_record["answers"] == rec["answers"]
        assert [t["text"] for t in r.trace] == [t["text"] for t in f.trace]
        assert [t["loss"]["total"] for t in r.trace] == pytest.approx([t["loss"]["total"] for t in f.trace])
    # a record drawn with other settings is kept but never matches
    assert not any(r.samples_reused for r in refine_many(model, tok, prompts, sample_cache=cache, **{**kw, "seed": 2}))
    with pytest.raises(ValueError, match="'tokens'"):
        SampleCache().restore(prompts[0], {**records[0], "tokens": "many"})
    with pytest.raises(ValueError, match="'answers' holds an invalid answer"):
        SampleCache().restore(prompts[0], {**records[0], "answers": [{"text": "1", "number": 1.0, "unit": None,
                                                                       "source": "guess"}]})
    assert refine_many(model, tok, prompts[:1], k_samples=0, iters=1, max_new_tokens=4)[0].sample_record is None


def test_refine_many_needs_per_sequence_selectors_and_matching_golds():
    from vps.refinement.loop import refine_many

    tok = tiny_tokenizer()
    prompts = [chat_prompt(tok, q, system=None) for q in ("1 + 1?", "2 + 2?")]
    batch_scope = vps.patch(tiny_model(tok), vps.VPSConfig(topk=8, scope="batch"))
    with pytest.raises(ValueError, match="scope='sequence'"):
        refine_many(batch_scope, tok, prompts, iters=1, k_samples=0, max_new_tokens=2)
    model = vps.patch(tiny_model(tok), vps.VPSConfig(topk=8))
    with pytest.raises(ValueError, match="golds"):
        refine_many(model, tok, prompts, ["#### 2"], mode="oracle", iters=1, k_samples=0, max_new_tokens=2)
    with pytest.raises(ValueError, match="at least one prompt"):
        refine_many(model, tok, [], iters=1)


def test_stop_strings_end_every_sample_and_decode():
    """A few-shot prompt's continuation runs on into made-up questions; refinement's samples and decodes stop
    where generation does, so neither their answers nor their token counts come from past a stop string."""
    from vps.refinement.loop import refine_many

    tok = tiny_tokenizer()
    model = vps.patch(tiny_model(tok), vps.VPSConfig(topk=8))
    prompts = [chat_prompt(tok, q, system=None) for q in ("What is 12 - 5 + 2?", "What is 3 + 4?")]
    kw = dict(iters=2, k_samples=3, max_new_tokens=12, seed=1)
    free = refine_many(model, tok, prompts, **kw)
    texts = [t for r in free for t in r.sample_record["texts"]] + [row["text"] for r in free for row in r.trace]
    stop = stop_inside(texts)
    stopped = refine_many(model, tok, prompts, stop_strings=[stop], **kw)
    cut = [t for r in stopped for t in r.sample_record["texts"]] + [row["text"] for r in stopped for row in r.trace]
    assert not any(stop in t for t in cut)
    assert sum(r.tokens for r in stopped) < sum(r.tokens for r in free)
    # the samples drawn without stops are not reused for a run with them
    assert stopped[0].sample_record["settings"] != free[0].sample_record["settings"]


def test_samples_and_candidates_are_read_in_the_configured_extraction_mode():
    """Votes, the target answer and the chosen candidate follow the run's --extract rule, not always the
    flexible one."""
    from vps.refinement.loop import draw_samples, refine_many
    from vps.verify import extract_answer

    tok = tiny_tokenizer()
    model = vps.patch(tiny_model(tok), vps.VPSConfig(topk=8))
    prompts = [chat_prompt(tok, q, system=None) for q in ("What is 12 - 5 + 2?", "What is 3 + 4?")]
    kw = dict(iters=2, k_samples=4, max_new_tokens=16, seed=1)
    read = {}
    for mode in ("flexible", "strict"):
        config = vps.refinement.RefineConfig(extract_mode=mode, **kw)
        _, drawn = draw_samples(model, tok, prompts, config)
        for d in drawn:
            assert d.answers == [extract_answer(t, mode) for t in d.texts]
        read[mode] = [a for d in drawn for a in d.answers]
        for r in refine_many(model, tok, prompts, extract_mode=mode, **kw):
            assert [row["answer"] for row in r.trace] == [
                None if (a := extract_answer(row["text"], mode)) is None else a.text for row in r.trace]
    # the tiny model's text holds numbers but no "#### x": flexible reads some, strict none
    assert any(a is not None for a in read["flexible"]) and all(a is None for a in read["strict"])
