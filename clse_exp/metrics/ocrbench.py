"""OCRBench: a row scores 1 if any gold answer is a substring of the prediction; scores are summed per
question type into a final score out of 1000, and `ocrbench_accuracy` = final / 1000 as lmms-eval divides
(by 1000 even for a subset; `ocrbench_final_score` is the raw sum).
"""

from __future__ import annotations

from collections.abc import Callable

TEXT_RECOGNITION = ("Regular Text Recognition", "Irregular Text Recognition", "Artistic Text Recognition",
                    "Handwriting Recognition", "Digit String Recognition", "Non-Semantic Text Recognition")
GROUPS = {  # our key -> the question types summed into it (maxima on the full set: 300, 200, 200, 200, 100)
    "ocrbench_text_recognition": TEXT_RECOGNITION,
    "ocrbench_scene_text_vqa": ("Scene Text-centric VQA",),
    "ocrbench_doc_vqa": ("Doc-oriented VQA",),
    "ocrbench_kie": ("Key Information Extraction",),
    "ocrbench_hmer": ("Handwritten Mathematical Expression Recognition",),
}
QUESTION_TYPES = tuple(t for types in GROUPS.values() for t in types)
_FULLWIDTH = {c: c - 0xFEE0 for c in range(0xFF01, 0xFF5F)}  # "！".."～" -> "!".."~"


def _no_spaces(text: str) -> str:
    return text.strip().replace("\n", " ").replace(" ", "")


def _plain(text: str) -> str:
    return text.lower().strip().replace("\n", " ")


def hit(answers: list[str] | str, prediction: str, dataset: str) -> bool:
    """HEAD: for HME100k (handwritten maths) spaces and newlines are removed from both sides and case is kept;
    otherwise both sides are lower-cased, stripped, newlines become spaces, and fullwidth ASCII is folded."""
    answers = [answers] if isinstance(answers, str) else list(answers)
    if dataset == "HME100k":
        return any(_no_spaces(a) in _no_spaces(prediction) for a in answers)
    pred = _plain(prediction).translate(_FULLWIDTH)
    return any(_plain(a).translate(_FULLWIDTH) in pred for a in answers)


def hit_legacy(answers: list[str] | str, prediction: str, dataset: str) -> bool:
    """v0.3.0: the prediction was lower-cased up front, also for HME100k where the gold was not (so gold with
    capitals never matches there); no fullwidth folding."""
    answers = [answers] if isinstance(answers, str) else list(answers)
    pred = prediction.lower().strip()
    if dataset == "HME100k":
        return any(_no_spaces(a) in _no_spaces(pred) for a in answers)
    return any(_plain(a) in _plain(pred) for a in answers)


Rule = Callable[[list[str] | str, str, str], bool]


def _score(docs: list[dict], predictions: list[str], rule: Rule) -> dict:
    # Sums are rebuilt on every call: lmms-eval's module-level OCRBench_score accumulates across calls.
    totals = dict.fromkeys(QUESTION_TYPES, 0)
    for doc, pred in zip(docs, predictions, strict=True):
        if doc["question_type"] not in totals:
            raise ValueError(f"OCRBench question_type={doc['question_type']!r} is not valid; "
                             f"choose one of: {', '.join(QUESTION_TYPES)}")
        totals[doc["question_type"]] += rule(doc["answer"], pred, str(doc.get("dataset", "")))
    groups = {key: sum(totals[t] for t in types) for key, types in GROUPS.items()}
    final = sum(groups.values())
    return {"ocrbench_accuracy": final / 1000, "ocrbench_final_score": final, **groups}


def ocrbench(docs: list[dict], predictions: list[str]) -> dict:
    """lmms-eval HEAD's rule."""
    return _score(docs, predictions, hit)


def ocrbench_legacy(docs: list[dict], predictions: list[str]) -> dict:
    """lmms-eval v0.3.0's rule (DART's vendored copy)."""
    return _score(docs, predictions, hit_legacy)
