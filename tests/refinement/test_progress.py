"""`vps.refinement.progress`: refinement says which phase it is in, to a callback the caller installs."""

import vps
from tests.helpers.tiny_eval import tiny_model, tiny_tokenizer
from vps.prompting import chat_prompt
from vps.refinement.loop import refine_many
from vps.refinement.progress import phase_reports, report_phase
from vps.refinement.samples import SampleCache


def test_refinement_reports_each_phase_in_order_and_only_inside_the_block():
    tok = tiny_tokenizer()
    model = vps.patch(tiny_model(tok), vps.VPSConfig(topk=8))
    prompts = [chat_prompt(tok, q, system=None) for q in ("What is 3 + 4?", "What is 12 - 5?")]
    cache, phases = SampleCache(), []
    kw = dict(iters=3, k_samples=2, max_new_tokens=4, seed=1, sample_cache=cache)
    refine_many(model, tok, prompts, **kw)  # outside a block: nothing to call, nothing fails
    assert len(cache)
    with phase_reports(phases.append):
        refine_many(model, tok, prompts, **{**kw, "sample_cache": SampleCache()})
    assert phases == ["sampling 2 per prompt", "iteration 1/3: decode", "iteration 2/3: refinement step",
                      "iteration 2/3: decode", "iteration 3/3: refinement step", "iteration 3/3: decode"]
    phases.clear()
    with phase_reports(phases.append):
        refine_many(model, tok, prompts, **kw)  # the samples come from the cache: no sampling phase
    assert phases[0] == "iteration 1/3: decode"


def test_blocks_nest_and_restore_the_outer_callback():
    outer, inner = [], []
    with phase_reports(outer.append):
        with phase_reports(inner.append):
            report_phase("a")
        report_phase("b")
        with phase_reports(None):
            report_phase("c")
    report_phase("d")
    assert (outer, inner) == (["b"], ["a"])
