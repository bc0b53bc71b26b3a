"""Answer extraction and the multi-objective verification loss (design doc section 6.1).

See ``docs/verification.md`` for the extraction rules and how each loss component is scored.
"""

from .composite import DEFAULT_WEIGHTS, CompositeVerifier
from .extract import EXTRACT_MODES, Answer, answers_match, extract_answer, parse_gold

__all__ = [
    "Answer", "EXTRACT_MODES", "extract_answer", "answers_match", "parse_gold", "CompositeVerifier", "DEFAULT_WEIGHTS",
]
