"""OCRBench: a prediction scores if any answer is a substring of it; groups summed to a score out of 1000."""

from __future__ import annotations

import unicodedata
from collections import defaultdict

GROUPS = {
    "Text Recognition": ("Regular Text Recognition", "Irregular Text Recognition", "Artistic Text Recognition",
                         "Handwriting Recognition", "Digit String Recognition", "Non-Semantic Text Recognition"),
    "Scene Text-centric VQA": ("Scene Text-centric VQA",),
    "Doc-oriented VQA": ("Doc-oriented VQA",),
    "Key Information Extraction": ("Key Information Extraction",),
    "Handwritten Mathematical Expression Recognition": ("Handwritten Mathematical Expression Recognition",),
}


def _fold(text: str) -> str:
    """Fullwidth ASCII to ASCII (lmms-eval HEAD)."""
    return "".join(unicodedata.normalize("NFKC", c) if "\uff01" <= c <= "\uff5e" else c for c in text)


def _hit(doc: dict, prediction: str) -> bool:
    answers = doc["answer"] if isinstance(doc["answer"], list) else [doc["answer"]]
    if doc.get("dataset") == "HME100k":  # spaces and newlines removed, case kept
        pred = prediction.strip().replace("\n", " ").replace(" ", "")
        return any(a.strip().replace("\n", " ").replace(" ", "") in pred for a in answers)
    pred = _fold(prediction.lower().strip().replace("\n", " "))
    return any(_fold(a.lower().strip().replace("\n", " ")) in pred for a in answers)


def ocrbench(docs: list[dict], predictions: list[str]) -> dict:
    totals: dict[str, int] = defaultdict(int)
    for doc, pred in zip(docs, predictions, strict=True):
        totals[doc["question_type"]] += _hit(doc, pred)
    groups = {g: sum(totals[t] for t in types) for g, types in GROUPS.items()}
    final = sum(groups.values())
    return {"ocrbench_accuracy": final / 1000, "ocrbench_final_score": final, **groups}
