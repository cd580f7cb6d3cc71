"""Scoring the synthetic task: exact match after a light normalisation of the model's word."""

from __future__ import annotations

import re
from collections import defaultdict

NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"))}


def normalize_answer(text: str) -> str:
    """First word, lower-cased, punctuation and a leading article removed, number words as digits."""
    words = re.sub(r"[^\w\s]", " ", text.strip().lower()).split()
    if words and words[0] in ("the", "a", "an") and len(words) > 1:
        words = words[1:]
    if not words:
        return ""
    return NUMBER_WORDS.get(words[0], words[0])


def score(docs: list[dict], predictions: list[str]) -> dict:
    """Accuracy overall and per question type."""
    if len(docs) != len(predictions):
        raise ValueError(f"{len(docs)} docs but {len(predictions)} predictions")
    hits: dict[str, list[bool]] = defaultdict(list)
    for doc, prediction in zip(docs, predictions, strict=True):
        hits[doc.get("qtype", "all")].append(normalize_answer(prediction) == normalize_answer(doc["answer"]))
    every = [h for group in hits.values() for h in group]
    out = {"accuracy": sum(every) / len(every) if every else 0.0, "n": len(every)}
    out.update({f"accuracy_{q}": sum(h) / len(h) for q, h in sorted(hits.items())})
    return out
