"""GQA: lmms-eval's generic `exact_match` with ignore_case and ignore_punctuation, nothing more.

No articles, number words or inner whitespace are normalised: "the table" != "table", and "red ." -> "red "
!= "red" (numpy's string `==` does not strip trailing spaces either).
"""

from __future__ import annotations

import string

_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


def clean(text: str) -> str:
    """Lower-case, then delete every `string.punctuation` character."""
    return text.lower().translate(_NO_PUNCTUATION)


def exact_match(docs: list[dict], predictions: list[str]) -> dict:
    """Fraction of predictions equal to `answer` after `clean`."""
    hits = [clean(p) == clean(str(d["answer"])) for d, p in zip(docs, predictions, strict=True)]
    return {"exact_match": sum(hits) / len(hits)}
