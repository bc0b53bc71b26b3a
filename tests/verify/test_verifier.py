"""Tests for the CompositeVerifier and its four components."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vps.verify import DEFAULT_WEIGHTS, Answer, CompositeVerifier
from vps.verify.algebra import SympyWorker
from vps.verify.numeric import graded_error
from vps.verify.safe_sympy import ParseError, check_equivalent, parse_expression

# Equal polynomials whose proof needs a degree-200 expansion in three variables: far beyond
# any test timeout, while the numeric probes (which would catch a difference) agree.
SLOW_PRED = "\\boxed{(x^2+2xy+y^2+z)^{100}}"
SLOW_GOLD = "((x+y)^2+z)^{100}"


@pytest.fixture(scope="module")
def worker() -> Iterator[SympyWorker]:
    w = SympyWorker()
    yield w
    w.close()


@pytest.fixture
def verifier(worker: SympyWorker) -> CompositeVerifier:
    return CompositeVerifier(worker=worker)


def num(value: float, unit: str | None = None) -> Answer:
    return Answer(text=str(value), number=value, unit=unit, source="literal")


# ---- numeric ---------------------------------------------------------------------------


def test_numeric_exact_and_within_tolerance(verifier: CompositeVerifier) -> None:
    assert verifier.compute_loss("#### 72", "#### 72")["components"]["numeric"] == 0.0
    assert verifier.compute_loss("The answer is 72.0000001", "72")["components"]["numeric"] == 0.0


def test_numeric_transform_and_raw_error(verifier: CompositeVerifier) -> None:
    result = verifier.compute_loss("#### 11", "#### 10")
    # e = 1, s = (0.1 * 10)^2 = 1
    assert result["components"]["numeric"] == pytest.approx(1 - math.exp(-1))
    assert result["details"]["numeric"]["squared_error"] == pytest.approx(1.0)
    assert result["details"]["numeric"]["scale"] == pytest.approx(1.0)


def test_numeric_scale_has_a_floor_of_one_for_small_gold() -> None:
    loss, details = graded_error(0.1, 0.0, 1e-6, 0.1)
    assert details["scale"] == pytest.approx(0.01)
    assert loss == pytest.approx(1 - math.exp(-1))


def test_numeric_is_monotone_and_bounded() -> None:
    losses = [graded_error(100 + d, 100, 1e-6, 0.1)[0] for d in (0.5, 1, 5, 10, 50, 1e6)]
    assert losses == sorted(losses)
    assert all(0 < x <= 1 for x in losses)
    assert graded_error(1e200, 1.0, 1e-6, 0.1)[0] == 1.0  # no OverflowError


def test_numeric_missing_pred_is_a_miss(verifier: CompositeVerifier) -> None:
    assert verifier.compute_loss(None, "#### 5")["components"]["numeric"] == 1.0
    assert verifier.compute_loss("I give up", "#### 5")["components"]["numeric"] == 1.0
    assert verifier.compute_loss("\\boxed{x+1}", "#### 5")["components"]["numeric"] == 1.0


def test_numeric_no_gold_is_no_evidence(verifier: CompositeVerifier) -> None:
    result = verifier.compute_loss("#### 5")
    assert result["components"]["numeric"] is None
    assert "numeric" in result["no_evidence"]


def test_numeric_converts_compatible_units(verifier: CompositeVerifier) -> None:
    result = verifier.compute_loss(num(2, "km"), num(2000, "m"))
    assert result["components"]["numeric"] == 0.0
    assert result["details"]["numeric"]["converted_from"] == "2 km"


# ---- units -----------------------------------------------------------------------------


def test_units_km_and_m_agree(verifier: CompositeVerifier) -> None:
    result = verifier.compute_loss("The distance is 2 km.", "2000 m")
    assert result["components"]["units"] == 0.0
    assert result["details"]["units"]["compatible"] is True


def test_units_incompatible_dimensions(verifier: CompositeVerifier) -> None:
    result = verifier.compute_loss(num(2, "km"), num(2, "kg"))
    assert result["components"]["units"] == 1.0
    assert result["details"]["units"]["compatible"] is False


def test_units_compatible_but_different_magnitude(verifier: CompositeVerifier) -> None:
    loss = verifier.compute_loss(num(3, "km"), num(2000, "m"))["components"]["units"]
    assert 0.9 < loss <= 1.0
    small = verifier.compute_loss(num(2.01, "km"), num(2000, "m"))["components"]["units"]
    assert 0 < small < 0.01


def test_units_currency(verifier: CompositeVerifier) -> None:
    assert verifier.compute_loss("It costs $5", "500 cents")["components"]["units"] == 0.0
    assert verifier.compute_loss("It costs $5", "€5")["components"]["units"] == 1.0


@pytest.mark.parametrize(
    "pred,gold",
    [
        (num(3, "apples"), num(3, "apples")),  # pint does not know apples
        (num(3, "km"), num(3)),  # gold has no unit (GSM8K golds never do)
        (num(3), num(3)),
        (num(3, "km"), None),
    ],
)
def test_units_no_evidence(verifier: CompositeVerifier, pred: Answer, gold: Answer | None) -> None:
    result = verifier.compute_loss(pred, gold)
    assert result["components"]["units"] is None
    assert "units" in result["no_evidence"]


# ---- algebraic -------------------------------------------------------------------------


def test_algebraic_equivalent(verifier: CompositeVerifier) -> None:
    result = verifier.compute_loss("\\boxed{x^2 - 1}", "(x-1)(x+1)")
    assert result["components"]["algebraic"] == 0.0
    assert result["details"]["algebraic"]["equal"] is True


def test_algebraic_different(verifier: CompositeVerifier) -> None:
    assert verifier.compute_loss("\\boxed{x^2 + 1}", "(x-1)(x+1)")["components"]["algebraic"] == 1.0


def test_algebraic_latex_and_constants(verifier: CompositeVerifier) -> None:
    assert verifier.compute_loss("\\boxed{\\frac{x}{2}}", "0.5x")["components"]["algebraic"] == 0.0
    assert verifier.compute_loss("\\boxed{\\sqrt{2} + x}", "x + 1.41421356237")["components"]["algebraic"] == 0.0
    assert verifier.compute_loss("\\boxed{\\sqrt{2} + x}", "x + 1.414")["components"]["algebraic"] == 1.0
    # A constant root has a value of its own now: the numeric component judges it.
    assert verifier.compute_loss("\\boxed{\\sqrt{2}}", "1.41421356237")["components"]["numeric"] == 0.0
    assert verifier.compute_loss("\\boxed{\\sqrt{2}}", "1.414")["components"]["numeric"] > 0.0


def test_algebraic_no_evidence_cases(verifier: CompositeVerifier) -> None:
    both_numbers = verifier.compute_loss("#### 5", "#### 5")
    assert both_numbers["components"]["algebraic"] is None
    unparsable = verifier.compute_loss("\\boxed{\\int_0^1 f}", "x")
    assert unparsable["components"]["algebraic"] is None
    assert unparsable["details"]["algebraic"]["reason"] == "parse_error"
    no_gold = verifier.compute_loss("\\boxed{x}")
    assert no_gold["components"]["algebraic"] is None


def test_algebraic_injection_runs_nothing(verifier: CompositeVerifier, tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    payload = f"__import__('os').system('touch {target}')"
    for pred, gold in [(f"\\boxed{{{payload}}}", "x"), ("\\boxed{x}", payload), (payload, payload)]:
        result = verifier.compute_loss(pred, gold)
        assert result["components"]["algebraic"] is None
    with pytest.raises(ParseError):
        parse_expression(payload)
    assert check_equivalent(payload, "x")["status"] == "parse_error"
    assert not target.exists()


@pytest.mark.parametrize(
    "text",
    [
        "x.__class__",
        "lambda: 1",
        "x; y",
        "exec",
        "import",
        "x_1",
        "9^999",
        "10^(10^10)",
        "(" * 50 + "x" + ")" * 50,
        "x+" * 150 + "x",
    ],
)
def test_safe_parser_refuses(text: str) -> None:
    with pytest.raises(ParseError):
        parse_expression(text)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("2x", "2*x"),
        ("(x-1)(x+1)", "(x - 1)*(x + 1)"),
        ("\\frac{3}{4}", "3/4"),
        ("x^2", "x**2"),
        ("3 \\cdot y", "3*y"),
        ("\\sqrt{4}", "2"),
        ("y = 2x+1", "2*x + 1"),
        ("-x^2", "-x**2"),
    ],
)
def test_safe_parser_accepts(text: str, expected: str) -> None:
    assert str(parse_expression(text)) == expected


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            list("0123456789xyz+-*/^(){}[] .=_'")
            + ["\\frac", "\\sqrt", "sqrt", "sin", "log", "pi", "\\cdot", "import", "\\int"]
        ),
        max_size=25,
    ).map("".join)
)
def test_safe_parser_only_raises_parse_error(text: str) -> None:
    try:
        parse_expression(text)
    except ParseError:
        pass


def test_worker_restarts_after_close(worker: SympyWorker) -> None:
    verifier = CompositeVerifier(worker=worker)
    worker.close()
    assert verifier.compute_loss("\\boxed{x y}", "yx")["components"]["algebraic"] == 0.0


def test_algebraic_timeout_returns_promptly(worker: SympyWorker) -> None:
    verifier = CompositeVerifier(sympy_timeout=0.5, worker=worker)
    verifier.compute_loss("\\boxed{x}", "x")  # start the worker outside the timed part
    start = time.monotonic()
    result = verifier.compute_loss(SLOW_PRED, SLOW_GOLD)
    elapsed = time.monotonic() - start
    assert elapsed < 0.5 + 1.0
    assert result["components"]["algebraic"] is None
    assert result["details"]["algebraic"]["reason"] == "timeout"
    # The killed worker is replaced on the next check.
    assert verifier.compute_loss("\\boxed{2y}", "y+y")["components"]["algebraic"] == 0.0


# ---- self-consistency ------------------------------------------------------------------


def test_self_consistency_without_gold(verifier: CompositeVerifier) -> None:
    samples = ["#### 5", "The answer is 5.", "so 5", "#### 6"]
    result = verifier.compute_loss("#### 5", samples=samples)
    assert result["components"]["self_consistency"] == pytest.approx(0.25)
    assert result["details"]["self_consistency"]["majority"] == "5"
    assert result["components"]["numeric"] is None
    # Only self_consistency has evidence, so the weighted mean is its loss.
    assert result["total"] == pytest.approx(0.25)


def test_self_consistency_unanswered_samples_count(verifier: CompositeVerifier) -> None:
    result = verifier.compute_loss("#### 5", samples=["#### 5", "no idea", None, num(5)])
    assert result["components"]["self_consistency"] == pytest.approx(0.5)


def test_self_consistency_symbolic_text(verifier: CompositeVerifier) -> None:
    result = verifier.compute_loss("\\boxed{x+1}", samples=["\\boxed{x + 1}", "\\boxed{x-1}"])
    assert result["components"]["self_consistency"] == pytest.approx(0.5)


@pytest.mark.parametrize("samples", [None, [], ["#### 5"]])
def test_self_consistency_needs_two_samples(verifier: CompositeVerifier, samples: list[str] | None) -> None:
    result = verifier.compute_loss("#### 5", samples=samples)
    assert result["components"]["self_consistency"] is None


def test_self_consistency_no_pred(verifier: CompositeVerifier) -> None:
    assert verifier.compute_loss(None, samples=["#### 5", "#### 5"])["components"]["self_consistency"] == 1.0


# ---- weights and total -----------------------------------------------------------------


def test_default_weights() -> None:
    assert dict(DEFAULT_WEIGHTS) == {"numeric": 1.0, "units": 0.5, "self_consistency": 0.3, "algebraic": 0.2}
    assert CompositeVerifier().weights == dict(DEFAULT_WEIGHTS)


def test_weights_merge_over_defaults() -> None:
    assert CompositeVerifier(weights={"units": 2.0}).weights["units"] == 2.0
    assert CompositeVerifier(weights={"units": 2.0}).weights["numeric"] == 1.0


def test_unknown_weight_names_raise() -> None:
    with pytest.raises(ValueError, match="'algebra'.*'bogus'"):
        CompositeVerifier(weights={"bogus": 1.0, "algebra": 1.0})


@pytest.mark.parametrize("bad", [-0.1, math.nan, math.inf, True, "1"])
def test_bad_weight_values_raise(bad: object) -> None:
    with pytest.raises(ValueError, match="weights\\['units'\\]"):
        CompositeVerifier(weights={"units": bad})  # type: ignore[dict-item]


@pytest.mark.parametrize("field", ["rel_tol", "sympy_timeout", "numeric_scale"])
def test_bad_scalars_raise(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        CompositeVerifier(**{field: 0})


def test_total_is_weighted_mean_over_evidence(verifier: CompositeVerifier) -> None:
    result = verifier.compute_loss(num(3, "km"), num(2, "kg"), samples=["3", "4"])
    c = result["components"]
    assert c["numeric"] == pytest.approx(1 - math.exp(-1 / 0.04))
    assert c["units"] == 1.0
    assert c["self_consistency"] == pytest.approx(0.5)
    assert c["algebraic"] is None
    expected_sum = 1.0 * c["numeric"] + 0.5 * 1.0 + 0.3 * 0.5
    assert result["weighted_sum"] == pytest.approx(expected_sum)
    assert result["evidence_weight"] == pytest.approx(1.8)
    assert result["total"] == pytest.approx(expected_sum / 1.8)
    assert result["no_evidence"] == ["algebraic"]
    assert result["weights"] == dict(DEFAULT_WEIGHTS)


def test_total_is_nan_without_evidence(verifier: CompositeVerifier) -> None:
    result = verifier.compute_loss("#### 5")
    assert math.isnan(result["total"])
    assert result["evidence_weight"] == 0.0
    assert sorted(result["no_evidence"]) == sorted(DEFAULT_WEIGHTS)


def test_zero_weight_skips_component(worker: SympyWorker) -> None:
    verifier = CompositeVerifier(weights={"algebraic": 0.0}, worker=worker)
    result = verifier.compute_loss("\\boxed{x+1}", "x+1")
    assert result["components"]["algebraic"] is None
    assert result["details"]["algebraic"]["reason"] == "weight is 0"


def test_input_validation(verifier: CompositeVerifier) -> None:
    with pytest.raises(TypeError, match="samples"):
        verifier.compute_loss("#### 5", samples="#### 5")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="pred"):
        verifier.compute_loss(5)  # type: ignore[arg-type]


def test_components_stay_in_unit_interval(verifier: CompositeVerifier) -> None:
    for pred, gold in [
        ("#### -1e9", "#### 3"),
        ("#### 0", "#### 0"),
        ("1/3 km", "1 m"),
        ("#### 10", "#### -10"),
    ]:
        result = verifier.compute_loss(pred, gold, samples=[pred, gold])
        for loss in result["components"].values():
            assert loss is None or 0.0 <= loss <= 1.0
        assert 0.0 <= result["total"] <= 1.0


# ---- wrong verdicts of the old verifier: expressions were cut to the number they start with ------

# (name, prediction, gold, component, expected loss of that component, expected total)
EXPRESSION_LOSS_CASES = [
    ("number_vs_symbolic_gold", "#### 2", "#### 2*x + 1", "algebraic", 1.0, 1.0),
    ("commuted_symbolic_sum", "#### x + 1", "#### 1 + x", "algebraic", 0.0, 0.0),
    ("constant_sum_vs_value", "#### 5 + 3", "#### 8", "numeric", 0.0, 0.0),
    ("power_vs_value", "#### 2**10", "#### 1024", "numeric", 0.0, 0.0),
    ("gold_answer_is_sentence", "#### 5", "The answer is 5", "numeric", 0.0, 0.0),
    ("gold_boxed", "The answer is 2.", "\\boxed{2}", "numeric", 0.0, 0.0),
]


@pytest.mark.parametrize("name,pred,gold,component,loss,total", EXPRESSION_LOSS_CASES,
                         ids=[c[0] for c in EXPRESSION_LOSS_CASES])
def test_expression_answers_are_scored_whole(verifier: CompositeVerifier, name: str, pred: str, gold: str,
                                             component: str, loss: float, total: float) -> None:
    result = verifier.compute_loss(pred, gold)
    assert result["components"][component] == loss
    assert result["total"] == pytest.approx(total)
