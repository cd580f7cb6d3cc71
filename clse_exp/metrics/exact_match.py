"""GQA: lmms-eval's generic exact_match with ignore_case and ignore_punctuation (no other normalisation)."""

from __future__ import annotations

import string

_DROP = str.maketrans("", "", string.punctuation)


def exact_match(docs: list[dict], predictions: list[str]) -> dict:
    hits = [p.strip().lower().translate(_DROP) == d["answer"].lower().translate(_DROP)
            for d, p in zip(docs, predictions, strict=True)]
    return {"exact_match": sum(hits) / len(hits)}
