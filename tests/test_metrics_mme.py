"""MME: parse_pred_ans quirks and per-image pair scoring (acc + acc+)."""

from __future__ import annotations

import pytest

from clse_exp.metrics import score
from clse_exp.metrics.mme import parse_yes_no


@pytest.mark.parametrize(("text", "label"), [
    ("Yes", "yes"), ("no.", "no"), ("y", "yes"), ("N.", "no"), ("x", "other"), ("", "other"),
    ("Not sure", "no"),          # "no" in the first 4 characters "not "
    ("Nope", "no"), ("Yes, it is", "yes"),
    ("I think yes", "other"),    # "i th" holds neither
    ("The answer is yes", "other"),
])
def test_parse_yes_no_follows_otter(text, label):
    assert parse_yes_no(text) == label


def _docs(rows):
    return [{"question_id": q, "category": c, "answer": a} for q, c, a in rows]


def test_pairs_score_acc_plus_only_when_both_questions_are_right():
    rows = [("a.png", "existence", "Yes"), ("a.png", "existence", "No"),
            ("b.png", "existence", "Yes"), ("b.png", "existence", "No"),
            ("c.png", "count", "No"), ("c.png", "count", "Yes"),
            ("d.png", "OCR", "Yes"), ("d.png", "OCR", "No"),
            ("e.png", "code_reasoning", "Yes"), ("e.png", "code_reasoning", "No"),
            ("f.png", "numerical_calculation", "Yes"), ("f.png", "numerical_calculation", "No")]
    preds = ["Yes", "No",                  # a: both right -> 100 + 100 = 200
             "yes.", "Yes",                # b: one right -> 50 + 0 = 50; existence = (200 + 50) / 2 = 125
             "Not sure", "y",              # c: "Not sure" -> no (right), "y" -> yes -> count = 200
             "Maybe", "n",                 # d: other (wrong), no (right) -> OCR = 50
             "The answer is yes", "No, it is not",  # e: other, no -> code_reasoning = 50
             "Yes", "No"]                  # f: numerical_calculation = 200
    out = score("mme", _docs(rows), preds)
    assert out["mme_existence"] == 125.0 and out["mme_count"] == 200.0 and out["mme_OCR"] == 50.0
    assert out["mme_perception_score"] == 375.0  # 125 + 200 + 50
    assert out["mme_cognition_score"] == 250.0   # 50 + 200
    assert out["mme_total_score"] == 625.0
    assert "mme_incomplete_images" not in out


def test_a_broken_pair_is_scored_and_flagged():
    rows = [("a.png", "existence", "Yes"), ("a.png", "existence", "No"), ("z.png", "existence", "No")]
    out = score("mme", _docs(rows), ["Yes", "No", "No"])
    # a: 200; z alone and right: 100 + 100 -> existence 200. lmms-eval would assert instead.
    assert out["mme_perception_score"] == 200.0
    assert out["mme_incomplete_images"] == 1 and "note" in out


def test_a_category_outside_perception_counts_as_cognition_like_lmms_eval():
    rows = [("a.png", "artworks", "Yes"), ("a.png", "artworks", "No")]  # misspelt: not a perception category
    out = score("mme", _docs(rows), ["Yes", "Yes"])
    assert out["mme_cognition_score"] == 50.0 and out["mme_perception_score"] == 0.0  # 50 + 0
