"""Answer extraction and the multi-objective verification loss (design doc section 6.1).

See ``docs/verification.md`` for the extraction rules and how each loss component is scored.
"""

from .compare import answers_match
from .composite import DEFAULT_WEIGHTS, CompositeVerifier
from .extract import EXTRACT_MODES, extract_answer, parse_gold
from .quantity import Answer

__all__ = [
    "Answer", "EXTRACT_MODES", "extract_answer", "answers_match", "parse_gold", "CompositeVerifier", "DEFAULT_WEIGHTS",
]
