"""POPE: lmms-eval's pooled scoring, and the LLaVA protocol (mean F1 over the three splits) as `pope_llava`.

lmms-eval compares `pred.lower().strip()` to the answer by string equality: "Yes." scores 0 and counts as
neither yes nor no. Its `pope_yes_ratio` is computed from the ground truth, not the predictions.
"""

from __future__ import annotations

import re
from collections import defaultdict


def _prf(pairs: list[tuple[str, str]]) -> tuple[float, float, float]:
    """Precision, recall, F1 with "yes" positive; only exact "yes"/"no" predictions are counted."""
    tp = sum(p == "yes" and g == "yes" for p, g in pairs)
    fp = sum(p == "yes" and g == "no" for p, g in pairs)
    fn = sum(p == "no" and g == "yes" for p, g in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def pope(docs: list[dict], predictions: list[str]) -> dict:
    pairs = [(p.lower().strip(), d["answer"].lower().strip()) for d, p in zip(docs, predictions, strict=True)]
    precision, recall, f1 = _prf(pairs)
    return {
        "pope_accuracy": sum(p == g for p, g in pairs) / len(pairs),
        "pope_precision": precision,
        "pope_recall": recall,
        "pope_f1_score": f1,
        "pope_yes_ratio": sum(g == "yes" for _, g in pairs) / len(pairs),
    }


def llava_label(prediction: str) -> str:
    """LLaVA's eval_pope: first sentence; "no" if it contains the word No, not or no, else "yes"."""
    first = prediction.strip().split(".")[0]
    words = re.sub(r"[^\w\s]", " ", first).split()
    return "no" if any(w in ("No", "not", "no") for w in words) else "yes"


def pope_llava(docs: list[dict], predictions: list[str]) -> dict:
    by_category: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for doc, prediction in zip(docs, predictions, strict=True):
        by_category[doc["category"]].append((llava_label(prediction), doc["answer"].lower().strip()))
    out = {}
    for category, pairs in sorted(by_category.items()):
        out[f"pope_llava_{category}_f1"] = _prf(pairs)[2]
        out[f"pope_llava_{category}_accuracy"] = sum(p == g for p, g in pairs) / len(pairs)
    every = [pair for pairs in by_category.values() for pair in pairs]
    out["pope_llava_f1_mean"] = sum(_prf(p)[2] for p in by_category.values()) / len(by_category)
    out["pope_llava_yes_ratio"] = sum(p == "yes" for p, _ in every) / len(every)
    return out
