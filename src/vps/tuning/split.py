"""Whether the data a study would tune on is a test split: by its questions, and by its name.

A file's name proves little: a copy or symlink of the GSM8K test file under another name holds the
test questions, while ``contest_train.jsonl`` or ``latest.jsonl`` merely contain the letters "test".
So the questions themselves are compared with the local GSM8K test set (the file ``gsm8k:test``
resolves to, see `vps.evaluation.data.gsm8k_path`) by a hash of their normalised text: Unicode NFKC,
case folded, reduced to its words (runs of letters and digits), so that whitespace, punctuation and
case changes do not hide a test question. Where that file is absent the content check cannot run,
and the result says so instead of passing the data as clean.

The name check remains for test splits of other data sets, which no local file can be compared
with: the file's name (or a named source such as ``gsm8k:test``) contains ``test`` or ``tests`` as a
word of its own (``test.jsonl``, ``my_test.jsonl``, ``gsm8k-test-copy.jsonl``), not inside another
word.
"""

from __future__ import annotations

import functools
import hashlib
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SplitCheck", "check_test_split", "name_says_test", "normalised_question_hash"]

_WORD = re.compile(r"\w+")
# "test" / "tests" with no letter on either side: digits, "_", "-", "." and the ends separate words.
_TEST_WORD = re.compile(r"(?<![^\W\d_])tests?(?![^\W\d_])")
_NAMED_TEST = ("gsm8k", "gsm8k:test")


def normalised_question_hash(text: str) -> str:
    """The sha256 of a question's normalised text (NFKC, case folded, its words joined by single spaces)."""
    words = _WORD.findall(unicodedata.normalize("NFKC", text).casefold())
    return hashlib.sha256(" ".join(words).encode("utf-8")).hexdigest()


def name_says_test(source: str, path: str | Path | None = None) -> bool:
    """Whether a data source's name marks it a test split: ``gsm8k`` / ``gsm8k:test``, or a file name with
    ``test`` (or ``tests``) as a word of its own."""
    if source.strip().lower() in _NAMED_TEST:
        return True
    name = Path(path if path is not None else source).name.lower()
    return _TEST_WORD.search(name) is not None


@dataclass(frozen=True)
class SplitCheck:
    """What the two checks found.

    ``overlap`` counts the questions found in the GSM8K test set (None where the content check could
    not run, ``unchecked`` then says why); ``total`` is how many questions were checked;
    ``test_file`` is the GSM8K test file compared with; ``by_name`` whether the name marks a test split.
    """

    total: int
    overlap: int | None
    test_file: Path | None
    by_name: bool
    unchecked: str | None = None

    @property
    def on_test(self) -> bool:
        """Whether the data counts as a test split: any question in the GSM8K test set, or its name says so."""
        return bool(self.overlap) or self.by_name

    def reason(self) -> str:
        """Why the data is (or may be) a test split, as a clause for a one-line message."""
        parts = []
        if self.overlap:
            parts.append(f"{self.overlap} of its {self.total} questions are in the GSM8K test set {self.test_file} "
                         f"(compared by normalised text)")
        if self.by_name:
            checked = ("" if self.overlap or self.overlap is None
                       else f"; none of its {self.total} questions is in the GSM8K test set {self.test_file}")
            parts.append(f"its name marks a test split{checked}")
        return "; ".join(parts) if parts else "no question is in the GSM8K test set and its name marks no test split"


def check_test_split(source: str, path: str | Path | None, questions: Sequence[str]) -> SplitCheck:
    """Compare ``questions`` (the items a study would tune on) with the local GSM8K test set, and read the
    name of ``source`` / ``path``."""
    from ..evaluation.data import gsm8k_path

    by_name = name_says_test(source, path)
    try:
        test_file = gsm8k_path("test")
    except FileNotFoundError as exc:
        return SplitCheck(len(questions), None, None, by_name, unchecked=str(exc))
    test_hashes = _test_hashes(test_file.resolve(), *_stamp(test_file))
    overlap = sum(normalised_question_hash(q) in test_hashes for q in questions)
    return SplitCheck(len(questions), overlap, test_file, by_name)


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=4)
def _test_hashes(path: Path, size: int, mtime_ns: int) -> frozenset[str]:
    """The question hashes of a GSM8K test file (cached by path, size and mtime: a changed file is read again)."""
    from ..evaluation.data import load_items

    return frozenset(normalised_question_hash(item.question) for item in load_items(path).items)
