"""Video multiple-choice scorers: Video-MME (HEAD, and v0.3.0 as `videomme_legacy`) and MVBench."""

from __future__ import annotations

import re
from collections import defaultdict

from clse_exp.metrics.mcq_extract import extract_letter
from clse_exp.metrics.vqa import strip_punctuation

# v0.3.0's prefixes, including two pairs that a missing comma glued into one string each.
_LEGACY_PREFIXES = ("The best answer is", "The correct answer is", "The answer is", "The answer",
                    "The best option isThe correct option is", "Best answer:Best option:")


def videomme_legacy_letter(prediction: str) -> str:
    """v0.3.0's extract_characters_regex: drop the answer prefixes, then the FIRST capital A-D anywhere, so
    "Based on ..." reads as "B"; "" when there is none. (Its "> 10 words and no A-D -> empty" rule gives the
    same "" and needs no branch here.)"""
    text = prediction.strip()
    for prefix in _LEGACY_PREFIXES:
        text = text.replace(prefix, "")
    found = re.search(r"[ABCD]", text)
    return found.group(0) if found else ""


def _videomme(docs: list[dict], letters: list[str]) -> dict:
    """`videomme_perception_score`: 100 * correct / rows (every row counts as answered), plus the same by
    `duration` (short, medium, long) when the column is there."""
    by_duration: dict[str, list[bool]] = defaultdict(list)
    hits = []
    for doc, letter in zip(docs, letters, strict=True):
        hit = letter == str(doc["answer"]).strip()
        hits.append(hit)
        if "duration" in doc:
            by_duration[str(doc["duration"])].append(hit)
    return {"videomme_perception_score": 100 * sum(hits) / len(hits),
            **{f"videomme_{d}": 100 * sum(h) / len(h) for d, h in sorted(by_duration.items())}}


def videomme(docs: list[dict], predictions: list[str]) -> dict:
    """HEAD: letters read by `extract_letter`."""
    return _videomme(docs, [extract_letter(p) for p in predictions])


def videomme_legacy(docs: list[dict], predictions: list[str]) -> dict:
    """v0.3.0 / DART: letters read by `videomme_legacy_letter`."""
    return _videomme(docs, [videomme_legacy_letter(p) for p in predictions])


def mvbench_option(text: str) -> str:
    """mcq_acc's `process`, applied to the prediction and to the gold letter alike: "X. ..." gives X;
    else VQA punctuation handling, strip quotes and brackets, lower-case, and the first stand-alone a-e,
    upper-cased (an article "a" reads as A); with no such letter, the processed text itself (it never
    equals a letter)."""
    option = re.match(r"^([A-E])\.\s*(.+)$", text.strip())
    if option:
        return option.group(1)
    cleaned = strip_punctuation(text.replace("\n", " ").replace("\t", " ").strip())
    cleaned = cleaned.strip("'").strip('"').strip(")").strip("(").strip().lower()
    letter = re.search(r"\b([a-e])\b", cleaned)
    return letter.group(1).upper() if letter else cleaned


def mvbench(docs: list[dict], predictions: list[str]) -> dict:
    """`mvbench_accuracy` = 100 * correct / answered: empty predictions leave the denominator. The gold letter
    is the position of `answer` in `candidates`."""
    correct = answered = 0
    for doc, pred in zip(docs, predictions, strict=True):
        candidates = list(doc["candidates"])
        if doc["answer"] not in candidates:
            raise ValueError(f"MVBench answer={doc['answer']!r} is not one of its candidates {candidates}")
        if pred.strip() == "":
            continue
        answered += 1
        correct += mvbench_option(pred) == mvbench_option(chr(65 + candidates.index(doc["answer"])))
    return {"mvbench_accuracy": 100 * correct / answered if answered else 0.0}
