"""An option letter read out of free text: our reading of lmms-eval HEAD's `extract_mcq_answer`.

The spec describes it as formats ranked by priority: starts with a letter > ends with a letter > a phrase
such as "the answer is X" > "(X)" > "X." > "X:" > "X)" > "X " > any occurrence; within one format the last
position wins. Our reading: a letter counts only when no letter or digit touches it (the capitals of
"Based" or "Dogs" are never answers), option letters are upper-case, and only the phrase words ignore case.
Used by MMStar, Video-MME and `mmbench_en_dev_static`.
"""

from __future__ import annotations

import re
from functools import cache

LETTERS = ("A", "B", "C", "D")


@cache
def _formats(letters: tuple[str, ...]) -> tuple[re.Pattern, ...]:
    x = "([" + "".join(re.escape(c) for c in letters) + "])"
    before, after = r"(?<![A-Za-z0-9])", r"(?![A-Za-z0-9])"
    return tuple(re.compile(p) for p in (
        rf"^{x}{after}",                                                   # "B", "B. dog", "B) because"
        rf"{before}{x}\W*$",                                               # "... is B.", "**B**"
        rf"(?i:answer|option|choice)(?:\s+(?i:is))?\s*:?\s*\(?{x}{after}",  # "The answer is (B)"
        rf"\({x}\)",
        rf"{before}{x}\.",
        rf"{before}{x}:",
        rf"{before}{x}\)",
        rf"{before}{x} ",
        rf"{before}{x}{after}",
    ))


def extract_letter(prediction: str, letters: tuple[str, ...] = LETTERS) -> str:
    """The option letter by the highest-priority format that occurs (its last occurrence), or ""."""
    text = prediction.strip()
    for pattern in _formats(tuple(letters)):
        found = list(pattern.finditer(text))
        if found:
            return found[-1].group(1)
    return ""
