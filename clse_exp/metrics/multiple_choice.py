"""Multiple-choice scorers with each task's own extraction rule (ScienceQA, SEED-Bench, MMStar, Video-MME,
MVBench), as lmms-eval HEAD implements them."""

from __future__ import annotations

import re
from collections import defaultdict

from clse_exp.metrics.vqa import _punctuation

LETTERS = ("A", "B", "C", "D")


def scienceqa(docs: list[dict], predictions: list[str]) -> dict:
    """Exact letter (case-insensitive) or "X." with an upper-case X; "(B)" scores 0."""
    hits = []
    for doc, pred in zip(docs, predictions, strict=True):
        pred, target = pred.strip(), chr(65 + int(doc["answer"]))
        if pred.lower() == target.lower():
            hits.append(True)
        else:
            hits.append(len(pred) > 1 and pred[0].isupper() and pred[1] == "." and pred[0] == target)
    return {"exact_match": sum(hits) / len(hits)}


def seedbench(docs: list[dict], predictions: list[str]) -> dict:
    """Only the first character of the prediction counts: "(C)" -> "(" is wrong."""
    by_type: dict[str, list[bool]] = defaultdict(list)
    for doc, pred in zip(docs, predictions, strict=True):
        pred = pred.strip()
        by_type[doc["data_type"]].append(pred[:1].lower() == doc["answer"].lower())
    every = [h for hits in by_type.values() for h in hits]
    out = {f"seed_{kind}": sum(h) / len(h) for kind, h in by_type.items()}
    return {**out, "seed_all": sum(every) / len(every)}


_FORMATS = (  # (priority, pattern): higher wins; within one format the last occurrence wins
    (8, r"^\(?([A-D])(?:\)|\.|:|\s|$)"),
    (7, r"(?:^|\s|\()([A-D])\)?\.?$"),
    (6, r"(?:answer|option|choice) (?:is|:)?\s*\(?([A-D])\b"),
    (5, r"\(([A-D])\)"),
    (4, r"\b([A-D])\."),
    (3, r"\b([A-D]):"),
    (2, r"\b([A-D])\)"),
    (1, r"\b([A-D]) "),
    (0, r"([A-D])"),
)


def extract_letter(prediction: str, letters: tuple[str, ...] = LETTERS) -> str:
    """The answer letter by lmms-eval's extract_mcq_answer priorities: a leading letter, a trailing letter,
    "the answer is X", "(X)", "X.", "X:", "X)", "X ", then any occurrence (the last one)."""
    text = prediction.strip()
    for _, pattern in _FORMATS:
        found = [m for m in re.finditer(pattern, text, flags=re.IGNORECASE if "answer" in pattern else 0)
                 if m.group(1).upper() in letters]
        if found:
            return found[-1].group(1).upper()
    return ""


def mmstar(docs: list[dict], predictions: list[str]) -> dict:
    """Macro average over l2 categories (`average`), and per-category means of their l2 categories."""
    by_l2: dict[tuple[str, str], list[bool]] = defaultdict(list)
    for doc, pred in zip(docs, predictions, strict=True):
        by_l2[(doc["category"], doc["l2_category"])].append(extract_letter(pred) == doc["answer"].strip().upper())
    l2_scores = {key: sum(h) / len(h) for key, h in by_l2.items()}
    categories: dict[str, list[float]] = defaultdict(list)
    for (category, _), value in l2_scores.items():
        categories[category].append(value)
    out = {category: sum(v) / len(v) for category, v in sorted(categories.items())}
    out["average"] = sum(l2_scores.values()) / len(l2_scores)
    return out


def videomme(docs: list[dict], predictions: list[str]) -> dict:
    hits = [extract_letter(p) == d["answer"].strip().upper() for d, p in zip(docs, predictions, strict=True)]
    return {"videomme_perception_score": 100 * sum(hits) / len(hits)}


def _mvbench_letter(text: str) -> str:
    match = re.match(r"^([A-E])\.\s*(.+)$", text.strip())
    if match:
        return match.group(1)
    cleaned = _punctuation(text).strip().strip("'\"()").lower()
    found = re.search(r"\b([a-e])\b", cleaned, flags=re.IGNORECASE)
    return found.group(1).upper() if found else ""


def mvbench(docs: list[dict], predictions: list[str]) -> dict:
    """Accuracy in percent over the answered questions: empty predictions leave the denominator."""
    hits = []
    for doc, pred in zip(docs, predictions, strict=True):
        if not pred.strip():
            continue
        gold = chr(65 + list(doc["candidates"]).index(doc["answer"]))
        hits.append(_mvbench_letter(pred) == gold)
    return {"mvbench_accuracy": 100 * sum(hits) / len(hits) if hits else 0.0}
