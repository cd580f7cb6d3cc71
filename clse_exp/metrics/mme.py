"""MME: per-image question pairs; category score = mean over pairs of acc + acc+ (max 200)."""

from __future__ import annotations

from collections import defaultdict

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
              "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def parse_yes_no(prediction: str) -> str:
    """lmms-eval's parse_pred_ans (from Otter): note "Not sure" parses as "no"."""
    text = prediction.lower().strip().replace(".", "")
    if text in ("yes", "no"):
        return text
    if len(text) == 1:
        return {"y": "yes", "n": "no"}.get(text, "other")
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def mme(docs: list[dict], predictions: list[str]) -> dict:
    pairs: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for doc, prediction in zip(docs, predictions, strict=True):
        gold = doc["answer"].lower().strip().replace(".", "")
        pairs[doc["category"]][doc["question_id"]].append(int(parse_yes_no(prediction) == gold))
    scores = {}
    for category, by_image in pairs.items():
        per_pair = [100 * sum(s) / len(s) + (100.0 if all(s) else 0.0) for s in by_image.values()]
        scores[category] = sum(per_pair) / len(per_pair)
    perception = sum(v for k, v in scores.items() if k in PERCEPTION)
    cognition = sum(v for k, v in scores.items() if k in COGNITION)
    return {"mme_perception_score": perception, "mme_cognition_score": cognition,
            "mme_total_score": perception + cognition,  # ours: papers' "MME" column (max 2800)
            **{f"mme_{k}": v for k, v in sorted(scores.items())}}
