"""OCRBench: substring hits summed per question type; handwritten maths compares without spaces."""

from __future__ import annotations

import pytest

from clse_exp.metrics import score

HMER = "Handwritten Mathematical Expression Recognition"
ROWS = [  # (dataset, question_type, answers, prediction)
    ("HME100k", HMER, ["x ^ { 2 } + 1"], "x^{2}+1"),
    ("HME100k", HMER, ["\\frac { A } { B }"], "\\frac{A}{B}"),
    ("IIIT5K", "Regular Text Recognition", ["Hello"], "It says HELLO\nworld"),
    ("docVQA", "Doc-oriented VQA", ["abc-123"], "ＡＢＣ-123"),
    ("FUNSD", "Key Information Extraction", ["2019", "2020"], "The year is 2020."),
    ("textVQA", "Scene Text-centric VQA", ["stop"], "go"),
]


def _run(task):
    docs = [{"dataset": d, "question_type": t, "answer": a} for d, t, a, _ in ROWS]
    return score(task, docs, [p for *_, p in ROWS])


def test_head_removes_spaces_for_handwritten_maths_and_keeps_case():
    out = _run("ocrbench")
    # HMER: both right once spaces go (case kept on both sides) -> 2; "hello" in "it says hello world" -> 1;
    # fullwidth "ＡＢＣ" folds to "abc" -> 1; "2020" inside -> 1; "stop" not in "go" -> 0. Final 5 of 1000.
    assert out["ocrbench_final_score"] == 5 and out["ocrbench_accuracy"] == pytest.approx(0.005)
    assert out["ocrbench_hmer"] == 2 and out["ocrbench_scene_text_vqa"] == 0
    assert _run("ocrbench") == out  # no accumulation across calls (lmms-eval's module-level dict does)


def test_legacy_lower_cases_the_prediction_only_and_does_not_fold():
    out = _run("ocrbench_legacy")
    # "\frac{a}{b}" no longer contains "\frac{A}{B}"; "ａｂｃ-123" does not contain "abc-123": 5 - 2 = 3
    assert out["ocrbench_final_score"] == 3 and out["ocrbench_accuracy"] == pytest.approx(0.003)


def test_unknown_question_type_is_refused():
    with pytest.raises(ValueError, match="Poetry"):
        score("ocrbench", [{"dataset": "x", "question_type": "Poetry", "answer": ["a"]}], ["a"])
