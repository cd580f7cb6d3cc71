"""POPE: lmms-eval's pooled scoring (`pope`) and the LLaVA protocol most pruning papers report (`pope_llava`).

lmms-eval compares `pred.lower().strip()` with the answer by string equality: "Yes." scores 0 and counts as
neither yes nor no in precision and recall. Its `pope_yes_ratio` is computed from the ground truth.
LLaVA's eval_pope.py instead maps every answer to yes/no from its first sentence and reports the mean F1 of
the three splits (adversarial, popular, random).
"""

from __future__ import annotations

from collections import defaultdict


def precision_recall_f1(pairs: list[tuple[str, str]]) -> tuple[float, float, float]:
    """(prediction, gold) pairs, "yes" positive. Predictions other than exactly "yes"/"no" enter no count;
    an empty denominator gives 0, as lmms-eval does."""
    tp = sum(p == "yes" and g == "yes" for p, g in pairs)
    fp = sum(p == "yes" and g == "no" for p, g in pairs)
    fn = sum(p == "no" and g == "yes" for p, g in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def _gold(doc: dict) -> str:
    gold = str(doc["answer"]).lower().strip()
    if gold not in ("yes", "no"):
        raise ValueError(f"POPE answer={doc['answer']!r} is not valid; choose one of: yes, no")
    return gold


def pope(docs: list[dict], predictions: list[str]) -> dict:
    """lmms-eval `pope`: accuracy, precision, recall, F1 pooled over all rows; yes-ratio of the gold."""
    pairs = [(p.lower().strip(), _gold(d)) for d, p in zip(docs, predictions, strict=True)]
    precision, recall, f1 = precision_recall_f1(pairs)
    return {
        "pope_accuracy": sum(p == g for p, g in pairs) / len(pairs),
        "pope_precision": precision,
        "pope_recall": recall,
        "pope_f1_score": f1,
        "pope_yes_ratio": sum(g == "yes" for _, g in pairs) / len(pairs),
    }


def llava_label(prediction: str) -> str:
    """LLaVA's eval_pope.py: keep the text before the first ".", drop commas, split on single spaces; "no" if
    a word is exactly "No", "not" or "no", else "yes". So "No!" and "Not sure" read as "yes"."""
    words = prediction.split(".")[0].replace(",", "").split(" ")
    return "no" if any(w in ("No", "not", "no") for w in words) else "yes"


def pope_llava(docs: list[dict], predictions: list[str]) -> dict:
    """Per-split accuracy/precision/recall/F1/yes-ratio, and their means over the splits (`pope_llava_f1_mean`
    is the papers' POPE number). Splits come from the `category` column."""
    by_split: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for doc, prediction in zip(docs, predictions, strict=True):
        by_split[str(doc["category"])].append((llava_label(prediction), _gold(doc)))
    out: dict[str, float] = {}
    for split, pairs in sorted(by_split.items()):
        precision, recall, f1 = precision_recall_f1(pairs)
        out[f"pope_llava_{split}_accuracy"] = sum(p == g for p, g in pairs) / len(pairs)
        out[f"pope_llava_{split}_precision"] = precision
        out[f"pope_llava_{split}_recall"] = recall
        out[f"pope_llava_{split}_f1"] = f1
        out[f"pope_llava_{split}_yes_ratio"] = sum(p == "yes" for p, _ in pairs) / len(pairs)
    for name in ("f1", "accuracy"):
        out[f"pope_llava_{name}_mean"] = sum(out[f"pope_llava_{s}_{name}"] for s in by_split) / len(by_split)
    every = [pair for pairs in by_split.values() for pair in pairs]
    out["pope_llava_yes_ratio"] = sum(p == "yes" for p, _ in every) / len(every)
    return out
