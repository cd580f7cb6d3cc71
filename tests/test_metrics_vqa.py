"""VQA accuracy (TextVQA, VizWiz): EvalAI normalisation and the leave-one-out min(#/3, 1)."""

from __future__ import annotations

import pytest

from clse_exp.metrics import score
from clse_exp.metrics.vqa import normalize, vqa_accuracy


@pytest.mark.parametrize(("raw", "normal"), [
    ("Two dogs!", "2 dogs"),      # "!" not next to a space -> space; "two" -> "2"
    ("None", "0"),                # EvalAI maps "none" to "0"
    ("The cat.", "cat"),          # period not before a digit goes; article goes
    ("3.5", "3.5"),               # period before a digit stays
    ("dont", "don't"),            # contractions are added, not removed
    ("x-ray", "x ray"),           # "-" touching no space -> space
    ("x - ray", "x ray"),         # "-" next to a space -> deleted
    ("1,000", "1000"),            # commas always go
    ("man's hat", "man 's hat"),  # "'s" is split off
    ("Ten-year\tplan", "10 year plan"),
])
def test_normalize_matches_evalai(raw, normal):
    assert normalize(raw) == normal


def test_normalize_removes_at_most_32_periods_like_the_evaluator():
    # sub("", text, re.UNICODE) passes 32 as `count`: of 40 periods, 8 survive.
    assert normalize("." * 40) == "." * 8


def test_vqa_accuracy_is_the_mean_over_ten_leave_one_out_subsets():
    answers = ["2 dogs", "two dogs", "dogs", "dogs", "dogs", "2", "2", "two", "two", "None"]
    # "Two dogs!" -> "2 dogs"; 2 humans agree. Leaving out one of those 2: 1 match -> 1/3 (twice);
    # leaving out any of the other 8: 2 matches -> 2/3. (2 * 1/3 + 8 * 2/3) / 10 = 0.6
    assert vqa_accuracy("Two dogs!", answers) == pytest.approx(0.6)
    # "2": 4 humans ("2", "2", "two", "two") -> every subset keeps >= 3 -> 1.0
    assert vqa_accuracy("2", answers) == 1.0
    # "None" -> "0": 1 human ("None") -> 9 subsets with 1 match (1/3), 1 with none -> 9/30 = 0.3
    assert vqa_accuracy("None", answers) == pytest.approx(0.3)
    # 3 humans: 3 subsets with 2 (2/3) and 7 with 3 (1) -> (2 + 7) / 10 = 0.9
    assert vqa_accuracy("dogs", answers) == pytest.approx(0.9)


def test_vizwiz_unanswerable_is_an_ordinary_answer_and_no_answers_score_zero():
    answers = ["unanswerable"] * 6 + ["blue"] * 2 + ["navy"] * 2
    docs = [{"answers": answers}, {"answers": answers}, {"answers": []}, {"answers": None}]
    out = score("vizwiz_vqa_val", docs, ["Unanswerable.", "blue", "unanswerable", "unanswerable"])
    # 6 agree -> 1.0; "blue": 2 agree -> 0.6 (as above); no answers -> 0 twice. (1 + 0.6) / 4 = 0.4
    assert out == {"exact_match": pytest.approx(0.4)}


def test_textvqa_and_its_ocr_prompt_variant_score_alike():
    docs = [{"answers": ["lg"] * 3 + ["life's good"] * 7}, {"answers": ["stop"] * 10}]
    preds = ["LG", "Stop sign"]
    # "lg": 3 agree -> 0.9; "stop sign" != "stop" -> 0. Mean 0.45
    assert score("textvqa_val", docs, preds) == score("textvqa_val_ocr", docs, preds) == {
        "exact_match": pytest.approx(0.45)}
