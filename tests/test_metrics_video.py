"""Video multiple choice: MVBench (empty answers leave the denominator) and Video-MME (HEAD and v0.3.0)."""

from __future__ import annotations

import pytest

from clse_exp.metrics import score
from clse_exp.metrics.video import mvbench_option


def test_mvbench_excludes_empty_answers_from_the_denominator():
    docs = [{"candidates": ["run", "walk", "sit"], "answer": "walk"}] * 7  # gold letter B
    preds = ["(B) walk", "", "   ", "A", "b. walk", "a person walks", "walk"]
    # answered 5 (two blanks after the strip); right: "(B) walk" and "b. walk" ("b walk" -> b) -> 2;
    # "a person walks" reads the article as A; "walk" has no letter. 100 * 2 / 5 = 40
    assert score("mvbench", docs, preds) == {"mvbench_accuracy": 40.0}


def test_mvbench_all_empty_scores_zero_and_a_bad_answer_is_refused():
    assert score("mvbench", [{"candidates": ["x", "y"], "answer": "x"}], [""]) == {"mvbench_accuracy": 0.0}
    with pytest.raises(ValueError, match="'z'"):
        score("mvbench", [{"candidates": ["x", "y"], "answer": "z"}], ["A"])


def test_mvbench_option_reading():
    assert mvbench_option("C. sit down") == "C"
    assert mvbench_option("The answer is B") == "B"  # first stand-alone a-e after lower-casing
    assert mvbench_option("walk") == "walk"


VIDEOMME = [("A", "short", "A"), ("C", "short", "Based on the video, the answer is C."),
            ("C", "medium", "The best answer is C"), ("D", "long", "I think the answer is A")]


def _videomme(task):
    docs = [{"answer": a, "duration": d} for a, d, _ in VIDEOMME]
    return score(task, docs, [p for *_, p in VIDEOMME])


def test_videomme_head_is_micro_accuracy_in_percent():
    out = _videomme("videomme")
    # letters A, C (trailing), C (trailing), A -> 3 of 4 right = 75; short 2/2, medium 1/1, long 0/1
    assert out == {"videomme_perception_score": 75.0, "videomme_long": 0.0, "videomme_medium": 100.0,
                   "videomme_short": 100.0}


def test_videomme_legacy_takes_the_first_capital_anywhere():
    out = _videomme("videomme_legacy")
    # "Based ..." -> "B" (wrong); "The best answer is" is stripped -> "C"; "I think ..." -> "A" (wrong).
    # 2 of 4 = 50; short 1/2
    assert out["videomme_perception_score"] == 50.0 and out["videomme_short"] == 50.0
