"""Differential test of our answer checking against HuggingFace's math-verify.

math-verify is a test dependency only: it parses with sympy's ``parse_expr``, which evaluates Python,
so ``vps`` never imports it (checked below). Both sides read a prediction and a gold and give a verdict:
ours is ``answers_match(extract_answer(pred), parse_gold(gold))``, theirs ``verify(parse(gold),
parse(pred))``. Every class of disagreement is explained in docs/verification.md ("Differences from
math-verify"); the tables below assert agreement where math-verify is right (ours were fixed to
agree) and our documented verdict where we differ on purpose.

Run as a script to compare on every stored model output under results/ and print the agreement::

    OMP_NUM_THREADS=1 .venv/bin/python tests/verify/test_math_verify_diff.py [--show]
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

math_verify = pytest.importorskip("math_verify")

from vps.verify import answers_match, extract_answer, parse_gold  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
# Runs whose rows the test reads (published, finished); the script reads every run under results/.
TEST_RUNS = ("qwen-acc-n250", "smollm2-acc-n250", "qwen-refine-n50", "smollm2-refine-n50", "qwen15-bf16-acc-n250")

AGREE, OURS_RIGHT, DELIBERATE = "agree", "ours right", "deliberate"

# (name, gold, prediction, our verdict, class). "agree": math-verify gives the same verdict; "ours
# right" and "deliberate": math-verify gives the other verdict, for the reason written in
# docs/verification.md. Rows marked "fixed" gave the other verdict on our side before the verifier rewrite.
PAIRS = [
    # fractions and decimals
    ("decimal_vs_fraction", "#### 0.75", "#### 3/4", True, AGREE),
    ("decimal_vs_latex_fraction", "#### 0.75", "\\boxed{\\frac{3}{4}}", True, AGREE),
    ("short_latex_fraction", "#### 0.75", "\\boxed{\\frac34}", True, AGREE),
    ("dfrac", "#### 0.5", "\\boxed{\\dfrac{1}{2}}", True, AGREE),
    ("latex_mixed_number", "#### 2.5", "\\boxed{2 \\frac{1}{2}}", True, AGREE),
    ("third_to_six_places", "#### 0.333333", "\\boxed{\\frac{1}{3}}", True, AGREE),
    ("third_to_two_places", "#### 0.33", "\\boxed{\\frac{1}{3}}", False, AGREE),
    ("negative_latex_fraction", "#### -0.75", "\\boxed{-\\frac{3}{4}}", True, AGREE),
    ("leading_dot", "#### 0.5", "The answer is .5", True, AGREE),
    ("plain_mixed_number", "#### 1.5", "#### 1 1/2", True, OURS_RIGHT),
    # percentages
    ("percent_vs_number", "#### 45", "The answer is 45%.", True, AGREE),
    ("percent_vs_fraction", "#### 0.45", "The answer is 45%.", True, AGREE),  # fixed
    ("latex_percent", "#### 45", "\\boxed{45\\%}", True, AGREE),
    ("percent_word", "#### 45", "The answer is 45 percent.", True, AGREE),
    # units and currency
    ("dollar_sign", "#### 18", "The answer is $18.", True, AGREE),
    ("dollars_word", "#### 18", "#### 18 dollars", True, AGREE),
    ("latex_text_unit", "#### 12", "\\boxed{12 \\text{ cm}}", True, AGREE),
    ("rate_unit", "#### 5", "The speed is 5 km/h", True, AGREE),
    ("degrees", "#### 30", "It is 30^\\circ C", True, AGREE),
    ("euro", "#### 5", "It costs €5", True, AGREE),
    ("cents_written_out", "#### 18", "#### $18.00", True, AGREE),
    ("km_is_not_m", "#### 2000", "\\boxed{2 \\text{ km}}", False, AGREE),
    # thousands separators
    ("separator_in_gold", "#### 1,234", "#### 1234", True, AGREE),
    ("separator_in_prediction", "#### 1234", "The answer is 1,234.", True, AGREE),
    ("two_separators", "#### 1234567", "\\boxed{1,234,567}", True, AGREE),
    ("latex_separator", "#### 1234", "\\boxed{1{,}234}", True, AGREE),  # fixed
    ("separator_and_decimals", "#### 1234.5", "#### 1,234.50", True, AGREE),
    ("space_is_no_separator", "#### 1234", "The answer is 1 234.", False, DELIBERATE),
    ("comma_is_no_decimal_point", "#### 12.34", "it costs 12,34", False, DELIBERATE),
    # negative numbers
    ("negative", "#### -7", "The answer is -7.", True, AGREE),
    ("negative_box", "#### -7", "\\boxed{-7}", True, AGREE),
    ("negative_dollars", "#### -5", "Balance: -$5", True, OURS_RIGHT),
    ("unicode_minus", "#### -4", "Result \u22124", True, OURS_RIGHT),
    ("hyphen_is_no_sign", "#### 19", "COVID-19", True, OURS_RIGHT),
    ("unmarked_subtraction", "#### 3", "so 10-3", True, DELIBERATE),
    ("unmarked_subtraction_not_negative", "#### -3", "so 10-3", False, AGREE),
    # LaTeX
    ("unmarked_root", "#### 2", "$\\sqrt{4}$", True, AGREE),  # fixed
    ("power", "#### 8", "\\boxed{2^3}", True, AGREE),  # fixed
    ("braced_power", "#### 1024", "\\boxed{2^{10}}", True, AGREE),  # fixed
    ("times", "#### 12", "\\boxed{3 \\times 4}", True, AGREE),  # fixed
    ("cdot", "#### 16", "\\boxed{(3+5) \\cdot 2}", True, AGREE),  # fixed
    ("assignment", "#### 5", "\\boxed{x = 5}", True, AGREE),
    ("inline_math_box", "#### 18", "\\(\\boxed{18}\\)", True, AGREE),
    ("display_math_box", "#### 18", "$$\\boxed{18}$$", True, AGREE),
    ("root_vs_decimal", "#### 1.41421356237", "\\boxed{\\sqrt{2}}", True, AGREE),  # fixed
    ("pi_vs_decimal", "#### 3.14159265359", "\\boxed{\\pi}", True, AGREE),  # fixed
    ("bold_latex", "#### 18", "\\boxed{\\textbf{18}}", True, AGREE),
    # expressions
    ("sum", "#### 8", "#### 5 + 3", True, AGREE),  # fixed
    ("sum_with_value", "#### 8", "#### 5 + 3 = 8", True, AGREE),
    ("python_power", "#### 1024", "#### 2**10", True, AGREE),  # fixed
    ("python_power_is_not_glued_digits", "#### 210", "#### 2**10", False, AGREE),  # fixed
    ("number_vs_symbolic_gold", "#### 2", "#### 2*x + 1", False, AGREE),  # fixed
    ("symbolic_gold_vs_number", "#### 2*x + 1", "#### 2", False, AGREE),  # fixed
    ("commuted_sum", "#### x + 1", "#### 1 + x", True, AGREE),  # fixed
    ("symbolic_gold_without_latex", "#### 2*x + 1", "\\boxed{2x+1}", True, OURS_RIGHT),  # fixed
    ("factored_gold_without_latex", "(x-1)(x+1)", "\\boxed{x^2-1}", True, OURS_RIGHT),  # fixed
    ("chained_operators", "#### 36", "#### 24 / 2 * 3", True, AGREE),  # fixed
    ("answer_is_product", "#### 18", "So the answer is 3 * 6.", True, AGREE),  # fixed
    ("difference", "#### 12", "#### 18 - 6", True, AGREE),  # fixed
    # gold formats
    ("gold_answer_is", "The answer is 5", "#### 5", True, AGREE),  # fixed
    ("gold_boxed", "\\boxed{2}", "The answer is 2.", True, AGREE),  # fixed
    ("gold_bare_number", "72", "#### 72", True, AGREE),
    ("gold_bare_money", "$5.50", "The answer is $5.50", True, AGREE),
    ("gold_gsm8k_solution", "Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72", "#### 72", True, AGREE),
    ("gold_last_hash", "#### 1\nthen\n#### 2", "#### 2", True, AGREE),
    # markdown
    ("bold_number", "#### 42", "The answer is **42**.", True, AGREE),
    ("bold_separated", "#### 1234", "#### **1,234**", True, AGREE),
    ("bold_label", "#### 16", "**Final Answer:** 16", True, AGREE),
    ("bold_italic", "#### 7", "#### ***7***", True, OURS_RIGHT),  # fixed
    # which marker
    ("first_hash_beats_later_box", "#### 5", "#### 5\nLet me redo it: \\boxed{7}", True, DELIBERATE),
    ("later_box_loses_to_first_hash", "#### 7", "#### 5\nLet me redo it: \\boxed{7}", False, DELIBERATE),
    ("latest_answer_is", "#### 4", "The answer is 3. Wait, the answer is 4.", True, AGREE),
    ("invented_continuation", "#### 72", "#### 72\n\nQuestion: more?\nAnswer: #### 5", True, OURS_RIGHT),
    ("prose_answer_is", "#### 9", "The answer is not obvious; we get 9", True, AGREE),
    # no answer, words
    ("number_word", "#### 7", "seven", False, AGREE),
    ("no_answer", "#### 7", "I cannot solve this.", False, AGREE),
    ("answer_is_because", "#### 42", "The answer is 42 because 6*7", True, AGREE),
    ("fraction_is_not_its_denominator", "#### 4", "x is 3/4", False, AGREE),
    ("fraction_in_prose", "#### 0.75", "x is 3/4", True, AGREE),
    ("sentence_end", "#### 5", "He has 5. Apples are red", True, AGREE),
]


def ours(gold: str, pred: str, mode: str = "flexible") -> bool:
    return bool(answers_match(extract_answer(pred, mode), parse_gold(gold)))


def theirs(gold: str, pred: str) -> bool:
    return bool(math_verify.verify(math_verify.parse(gold), math_verify.parse(pred)))


@pytest.mark.parametrize("name,gold,pred,verdict,kind", PAIRS, ids=[p[0] for p in PAIRS])
def test_adversarial_pairs(name: str, gold: str, pred: str, verdict: bool, kind: str) -> None:
    assert ours(gold, pred) is verdict
    if kind == AGREE:
        assert theirs(gold, pred) is verdict, "math-verify no longer agrees: re-check docs/verification.md"
    else:
        assert theirs(gold, pred) is not verdict, f"math-verify now agrees with us; this is no longer {kind!r}"


def stored_rows(runs: tuple[str, ...] | None = None) -> Iterator[tuple[str, dict]]:
    """``(run, row)`` for each distinct (output, gold) pair stored under results/ (``runs``: only those)."""
    seen: set[tuple[str, str]] = set()
    for path in sorted((REPO / "results").glob("**/results.jsonl")):
        if runs is not None and path.parent.name not in runs:
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line) if line.strip() else {}
            if row.get("output") is None or row.get("gold_text") is None:
                continue  # NLL-only and rescored rows carry no output
            key = (row["output"], str(row["gold_text"]))
            if key not in seen:
                seen.add(key)
                yield path.parent.name, row


# A turn the model invents after its answer ("#### 10Human: A farmer has ..."): a few-shot prompt without a
# chat template lets a model write the next user turn itself.
_INVENTED_TURN = re.compile(r"(?:Human|User|Question):")


def classify(row: dict) -> str:
    """``"agree"``, one of the documented disagreements (``"first ####"``, ``"invented turn"``) or
    ``"unexplained"``."""
    gold, output = str(row["gold_text"]), row["output"]
    theirs_verdict = theirs(gold, output)
    ours_verdict = ours(gold, output)
    if ours_verdict is theirs_verdict:
        return AGREE
    # "First #### wins" is our rule, math-verify reads the latest answer; our "last" mode reads that one.
    first, last = extract_answer(output, "flexible"), extract_answer(output, "last")
    if first != last and ours(gold, output, "last") is theirs_verdict:
        return "first ####"
    # math-verify reads the last answer of a turn the model invented after its own; on the text before that
    # turn it reads what we read.
    turn = _INVENTED_TURN.search(output)
    if turn is not None and theirs(gold, output[:turn.start()]) is ours_verdict:
        return "invented turn"
    return "unexplained"


def test_stored_outputs_disagree_only_where_documented() -> None:
    rows = list(stored_rows(TEST_RUNS))
    if not rows:
        pytest.skip("no stored results in this checkout")
    kinds = Counter(classify(row) for _, row in rows)
    assert kinds["unexplained"] == 0, kinds
    assert kinds[AGREE] / len(rows) > 0.95, kinds


def test_vps_never_imports_math_verify() -> None:
    code = ("import sys, vps, vps.verify, vps.evaluation.data, vps.evaluation.rescore; "
            "assert 'math_verify' not in sys.modules and 'latex2sympy2_extended' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def main(argv: list[str]) -> None:
    """Agreement on every stored output, per run and overall; ``--show`` prints each disagreement."""
    per_run: dict[str, Counter[str]] = {}
    for run, row in stored_rows():
        kind = classify(row)
        per_run.setdefault(run, Counter())[kind] += 1
        if kind != AGREE and "--show" in argv:
            print(f"  {run} {row['id']} {row['config']}: {kind}; gold {row['gold_text']!r}, "
                  f"ours {extract_answer(row['output'])!r}, theirs {math_verify.parse(row['output'])!r}")
    total: Counter[str] = sum(per_run.values(), Counter())
    for run, kinds in sorted(per_run.items()):
        print(f"{run}: {sum(kinds.values())} outputs, {dict(kinds)}")
    n = sum(total.values())
    print(f"all: {n} distinct outputs, agree {total[AGREE]} ({total[AGREE] / max(n, 1):.1%}), {dict(total)}")
    pair_agree = sum(ours(g, p) is theirs(g, p) for _, g, p, _, _ in PAIRS)
    print(f"adversarial pairs: {len(PAIRS)}, agree {pair_agree} ({pair_agree / len(PAIRS):.1%})")


if __name__ == "__main__":
    main(sys.argv[1:])
