"""Tests for vps.evaluation.data."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest

from vps.evaluation.data import Item, gsm8k_path, load_items
from vps.verify.extract import parse_gold


def _shared_test_split() -> Path:
    """The checked-in GSM8K test split: <repo>/../shared locally, <repo>/shared on some machines."""
    repo = Path(__file__).resolve().parents[2]
    for root in (repo, *repo.parents):
        candidate = root / "shared" / "data" / "gsm8k" / "test.jsonl"
        if candidate.is_file():
            return candidate
    return repo.parent / "shared" / "data" / "gsm8k" / "test.jsonl"  # absent: the GSM8K tests skip


SHARED_TEST = _shared_test_split()
needs_gsm8k = pytest.mark.skipif(not SHARED_TEST.is_file(), reason="shared GSM8K copy not present")


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def record(question: str, answer: str, **extra: object) -> str:
    return json.dumps({"question": question, "answer": answer, **extra})


@needs_gsm8k
def test_real_gsm8k_test_split() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = load_items(SHARED_TEST)
    assert len(result.items) == 1319
    assert result.skipped == []
    first = result.items[0]
    assert first.gold == 18.0
    assert first.id == "test-1" and first.index == 0
    assert first.question.startswith("Janet")
    assert all(item.gold is not None for item in result.items)
    assert len({item.id for item in result.items}) == 1319


@needs_gsm8k
def test_named_sources_resolve_to_shared_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VPS_DATA_DIR", raising=False)
    assert gsm8k_path("test").resolve() == SHARED_TEST.resolve()
    assert load_items("gsm8k", limit=3).path.resolve() == SHARED_TEST.resolve()
    assert load_items("gsm8k:test", limit=2).items == load_items(SHARED_TEST, limit=2).items
    assert gsm8k_path("train").name == "train.jsonl"


def test_data_dir_env_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "gsm8k").mkdir()
    write_jsonl(tmp_path / "gsm8k" / "train.jsonl", [record("q", "a\n#### 7")])
    monkeypatch.setenv("VPS_DATA_DIR", str(tmp_path))
    result = load_items("gsm8k:train")
    assert result.path == tmp_path / "gsm8k" / "train.jsonl"
    assert [item.gold for item in result.items] == [7.0]
    with pytest.raises(FileNotFoundError, match="VPS_DATA_DIR"):
        gsm8k_path("test")
    with pytest.raises(ValueError, match="split"):
        gsm8k_path("validation")


def test_unknown_source_says_hub_is_unreachable(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"'openai/gsm8k'.*hub datasets are not reachable"):
        load_items("openai/gsm8k")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_items(tmp_path / "missing.jsonl")


def test_malformed_lines_are_reported_with_line_numbers(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            record("q1", "a\n#### 1"),
            "{not json",
            "",
            json.dumps({"question": "q4"}),
            json.dumps({"question": 5, "answer": "#### 5"}),
            "[1, 2]",
            "   ",
            record("q8", "a\n#### 8"),
        ],
    )
    with pytest.warns(UserWarning) as caught:
        result = load_items(path)
    assert [item.id for item in result.items] == ["mixed-1", "mixed-8"]
    assert [item.index for item in result.items] == [0, 7]
    assert [line for line, _ in result.skipped] == [2, 4, 5, 6]
    reasons = dict(result.skipped)
    assert "invalid JSON" in reasons[2]
    assert "missing field 'answer'" in reasons[4]
    assert "'question' must be a string, got int" in reasons[5]
    assert "JSON object" in reasons[6]
    messages = [str(w.message) for w in caught]
    for line in (2, 4, 5, 6):
        assert any(f"{path}:{line}:" in message for message in messages)


def test_gold_parsing() -> None:
    assert parse_gold("so\n#### 1,234").number == 1234.0
    assert parse_gold("#### -3").number == -3.0
    assert parse_gold("#### 2.5").number == 2.5
    assert parse_gold("#### 1\nthen\n#### 2").number == 2.0
    # No marker and no number: a text label, as the harness has always stored it (this loader said None).
    assert (parse_gold("text without marker").number, parse_gold("text without marker").text) == (
        None, "text without marker")


def test_non_numeric_gold_is_kept_with_warning(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "g.jsonl", [record("q", "#### many")])
    with pytest.warns(UserWarning, match=r"g.jsonl:1: .*not a number \('many'\)"):
        result = load_items(path)
    assert result.items[0].gold == "many" and result.skipped == []


def test_field_mapping_and_id_field(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "custom.jsonl",
        [
            json.dumps({"problem": "p1", "solution": "#### 10", "uid": "a"}),
            json.dumps({"problem": "p2", "solution": "no gold", "uid": 7}),
            json.dumps({"problem": "p3", "solution": "#### 3", "uid": "a"}),
            json.dumps({"problem": "p4", "solution": "#### 4"}),
        ],
    )
    with pytest.warns(UserWarning):
        result = load_items(path, question_field="problem", answer_field="solution", id_field="uid")
    assert [(i.id, i.question, i.gold) for i in result.items] == [("a", "p1", 10.0), ("7", "p2", "no gold")]
    reasons = dict(result.skipped)
    assert "duplicate id 'a'" in reasons[3] and "line 1" in reasons[3]
    assert "missing id field 'uid'" in reasons[4]


def many_items(tmp_path: Path, count: int = 50) -> Path:
    return write_jsonl(tmp_path / "many.jsonl", [record(f"q{i}", f"#### {i}") for i in range(count)])


def test_sample_is_deterministic_and_in_file_order(tmp_path: Path) -> None:
    path = many_items(tmp_path)
    ids = [i.id for i in load_items(path, sample=10, seed=1).items]
    assert ids == [i.id for i in load_items(path, sample=10, seed=1).items]
    assert ids != [i.id for i in load_items(path, sample=10, seed=2).items]
    indices = [i.index for i in load_items(path, sample=10, seed=1).items]
    assert indices == sorted(indices) and len(set(indices)) == 10


def test_offset_and_limit_apply_after_sample(tmp_path: Path) -> None:
    path = many_items(tmp_path)
    everything = load_items(path).items
    assert [i.index for i in load_items(path, offset=5, limit=3).items] == [5, 6, 7]
    assert load_items(path, offset=48, limit=10).items == everything[48:]
    assert load_items(path, offset=60).items == []
    assert load_items(path, limit=0).items == []
    sampled = load_items(path, sample=10, seed=3).items
    assert load_items(path, sample=10, seed=3, offset=2, limit=4).items == sampled[2:6]


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"limit": -1}, "limit"),
        ({"offset": -2}, "offset"),
        ({"offset": 1.5}, "offset"),
        ({"sample": -1}, "sample"),
        ({"sample": True}, "sample"),
        ({"sample": 51}, "sample"),
        ({"seed": "x"}, "seed"),
    ],
)
def test_argument_validation_names_the_argument(tmp_path: Path, kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        load_items(many_items(tmp_path), **kwargs)


def test_item_is_frozen() -> None:
    item = Item(id="x-1", question="q", answer="#### 1", gold=1.0, index=0)
    with pytest.raises(AttributeError):
        item.gold = 2.0  # type: ignore[misc]


# ---- one gold rule for the loader and the harness (one parse_gold) ----------------------------------

# (name, the JSON value of "answer", Item.gold, Item.answer, a warning the loader gives or None)
LOADER_GOLD_CASES = [
    ("gsm8k", "work\n#### 1,234", 1234.0, "work\n#### 1,234", None),
    ("hash_word", "#### six", "six", "#### six", r"after '####' is not a number \('six'\)"),
    ("answer_is_sentence", "The answer is 5", 5.0, "The answer is 5", None),
    ("boxed", "\\boxed{2}", 2.0, "\\boxed{2}", None),
    ("hash_expression", "#### 2*x + 1", "2*x + 1", "#### 2*x + 1", r"not a number \('2\*x \+ 1'\)"),
    ("bare_int", 4, 4.0, "4", None),
    ("bare_float", 2.5, 2.5, "2.5", None),
    ("hash_then_nothing", "work ####", None, "work ####", "no gold answer"),
]


@pytest.mark.parametrize("name,value,gold,answer,warning", LOADER_GOLD_CASES, ids=[c[0] for c in LOADER_GOLD_CASES])
def test_loader_gold_is_the_harness_gold(tmp_path: Path, name: str, value: object, gold: object, answer: str,
                                         warning: str | None) -> None:
    from vps.evaluation.methods.rows import gold as _gold

    path = write_jsonl(tmp_path / "g.jsonl", [json.dumps({"question": "q", "answer": value})])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = load_items(path)
    messages = [str(w.message) for w in caught]
    if warning is None:
        assert messages == []
    else:
        assert len(messages) == 1 and re.search(warning, messages[0]), messages
    (item,) = result.items
    assert (item.gold, item.answer) == (gold, answer)
    assert _gold(item)[0] == item.gold  # what the harness writes into the row's "gold"


def test_gold_parser_is_the_verify_one() -> None:
    from vps import verify

    assert parse_gold is verify.parse_gold


@pytest.mark.parametrize("value", [True, None, [4], {"n": 4}, float("inf")])
def test_answer_field_that_is_no_answer_is_skipped(tmp_path: Path, value: object) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [json.dumps({"question": "q", "answer": value})])
    with pytest.warns(UserWarning, match="'answer' must be a string or a number"):
        result = load_items(path)
    assert result.items == [] and len(result.skipped) == 1


def test_a_file_saved_with_a_byte_order_mark_keeps_its_first_item(tmp_path):
    """Editors on Windows save UTF-8 with a BOM; read as plain UTF-8 it glued to the first line's JSON."""
    import json

    from vps.evaluation import load_items

    lines = [json.dumps({"question": f"q{i}?", "answer": f"#### {i}"}) for i in range(3)]
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode("utf-8") + b"\n")
    loaded = load_items(path)
    assert [it.question for it in loaded.items] == ["q0?", "q1?", "q2?"] and not loaded.skipped
