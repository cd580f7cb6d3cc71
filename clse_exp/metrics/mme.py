"""MME: two yes/no questions per image; per pair acc + acc+ (max 200), category score = mean over pairs,
perception = sum of 10 categories (max 2000), cognition = sum of 4 (max 800), as lmms-eval computes them.
"""

from __future__ import annotations

from collections import defaultdict

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
              "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def parse_yes_no(prediction: str) -> str:
    """lmms-eval's parse_pred_ans (from Otter): "yes"/"no" after dropping periods; a lone "y"/"n"; else
    "yes" or "no" inside the first 4 characters. Quirk kept: "Not sure" parses as "no"."""
    text = prediction.lower().strip().replace(".", "")
    if text in ("yes", "no"):
        return text
    if len(text) == 1:
        return {"y": "yes", "n": "no"}.get(text, "other")
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def mme(docs: list[dict], predictions: list[str]) -> dict:
    """`mme_perception_score` and `mme_cognition_score` as lmms-eval reports them, plus our
    `mme_total_score` (the papers' MME column, max 2800) and `mme_<category>` (max 200 each).

    lmms-eval asserts exactly two rows per image; a subsampled run can break pairs, so an image with another
    count is still scored (acc+ = all its questions right) and counted in `mme_incomplete_images`.
    """
    rows: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for doc, prediction in zip(docs, predictions, strict=True):
        gold = str(doc["answer"]).lower().strip().replace(".", "")
        rows[doc["category"]][str(doc["question_id"])].append(int(parse_yes_no(prediction) == gold))
    categories, incomplete = {}, 0
    for category, by_image in rows.items():
        pair_scores = [100.0 * sum(s) / len(s) + (100.0 if all(s) else 0.0) for s in by_image.values()]
        categories[category] = sum(pair_scores) / len(pair_scores)
        incomplete += sum(len(s) != 2 for s in by_image.values())
    # lmms-eval routes every category that is not perception to the cognition key; so do we.
    perception = sum(v for k, v in categories.items() if k in PERCEPTION)
    cognition = sum(v for k, v in categories.items() if k not in PERCEPTION)
    out = {"mme_perception_score": perception, "mme_cognition_score": cognition,
           "mme_total_score": perception + cognition,
           **{f"mme_{k}": v for k, v in sorted(categories.items())}}
    if incomplete:
        out["mme_incomplete_images"] = incomplete
        out["note"] = "some images lack their question pair: not comparable with lmms-eval (it asserts pairs)"
    return out
