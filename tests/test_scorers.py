"""Benchmark scorers against hand-computed lmms-eval results on the edge cases that matter."""

from __future__ import annotations

import pytest

from clse_exp.metrics import score
from clse_exp.metrics.mme import parse_yes_no
from clse_exp.metrics.multiple_choice import extract_letter
from clse_exp.metrics.vqa import normalize, vqa_accuracy


def test_pope_counts_yes_dot_as_wrong_and_yes_ratio_from_gold():
    docs = [{"answer": a, "category": c} for a, c in
            [("yes", "random"), ("yes", "random"), ("no", "popular"), ("no", "adversarial")]]
    out = score("pope", docs, ["Yes.", "YES", "no", "yes"])
    # exact after lower/strip: "yes." != "yes" -> hits: 0,1,1,0 -> 0.5; TP=1 (row 2), FP=1 (row 4), FN=0
    assert out["pope_accuracy"] == 0.5
    assert out["pope_precision"] == 0.5 and out["pope_recall"] == 1.0
    assert out["pope_f1_score"] == pytest.approx(2 / 3)
    assert out["pope_yes_ratio"] == 0.5  # from the ground truth: 2 of 4


def test_pope_llava_protocol_reads_first_sentence_and_averages_f1():
    docs = [{"answer": "yes", "category": "random"}, {"answer": "no", "category": "random"},
            {"answer": "no", "category": "popular"}, {"answer": "yes", "category": "popular"}]
    out = score("pope_llava", docs, ["Yes. But not really.", "There is not a dog", "No", "Yes."])
    # random: yes/yes, no/no -> F1 1; popular: no/no, yes/yes -> F1 1
    assert out["pope_llava_f1_mean"] == 1.0 and out["pope_llava_yes_ratio"] == 0.5


def test_mme_pairs_and_not_sure():
    assert parse_yes_no("Not sure") == "no" and parse_yes_no("y") == "yes" and parse_yes_no("maybe") == "other"
    docs = [{"question_id": "a", "answer": "Yes", "category": "existence"},
            {"question_id": "a", "answer": "No", "category": "existence"},
            {"question_id": "b", "answer": "Yes", "category": "existence"},
            {"question_id": "b", "answer": "No", "category": "existence"},
            {"question_id": "c", "answer": "No", "category": "code_reasoning"},
            {"question_id": "c", "answer": "No", "category": "code_reasoning"}]
    out = score("mme", docs, ["Yes", "No", "Yes.", "Yes", "Not sure", "no"])
    # existence: pair a 100+100, pair b 50+0 -> mean 125; code: "Not sure"->no, both right -> 200
    assert out["mme_perception_score"] == 125 and out["mme_cognition_score"] == 200
    assert out["mme_total_score"] == 325


def test_vqa_normalisation_and_leave_one_out():
    assert normalize("Two dogs!") == "2 dogs" and normalize("None") == "0" and normalize("The cat.") == "cat"
    answers = ["2"] * 2 + ["two"] + ["3"] * 7  # three humans said 2 (after normalisation)
    # leave-one-out: dropping one of the three "2"s leaves 2 matches (2/3), 3 times; else 3 matches (1), 7 times
    assert vqa_accuracy("two", answers) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    assert score("vizwiz_vqa_val", [{"answers": []}], ["unanswerable"])["exact_match"] == 0.0


def test_gqa_ignores_case_and_punctuation_only():
    docs = [{"answer": "table"}, {"answer": "table"}, {"answer": "red"}]
    assert score("gqa", docs, ["Table.", "the table", "red!"])["exact_match"] == pytest.approx(2 / 3)


def test_scienceqa_letter_rules():
    docs = [{"answer": 1}] * 4
    # "B" and "B." score; "(B)" and "The answer is B" do not
    assert score("scienceqa_img", docs, ["B", "B. dog", "(B)", "The answer is B"])["exact_match"] == 0.5


def test_mmbench_circular_copies_must_all_be_right():
    base = {"A": "red", "B": "blue", "C": "nan", "D": "nan"}
    docs = [{**base, "index": 5, "answer": "A"}, {**base, "index": 1_000_005, "answer": "B"},
            {**base, "index": 6, "answer": "A"}, {**base, "index": 1_000_006, "answer": "B"}]
    out = score("mmbench_en_dev", docs, ["A", "B.", "(A)", "A"])  # question 6's copy is wrong
    assert out["gpt_eval_score"] == 50.0


def test_ocrbench_handwritten_math_ignores_spaces():
    docs = [{"dataset": "HME100k", "question_type": "Handwritten Mathematical Expression Recognition",
             "answer": ["x ^ 2"]},
            {"dataset": "IIIT5K", "question_type": "Regular Text Recognition", "answer": ["Hello"]}]
    out = score("ocrbench", docs, ["x^{}2".replace("{}", ""), "it says HELLO world"])
    assert out["ocrbench_final_score"] == 2 and out["ocrbench_accuracy"] == 0.002


def test_mvbench_excludes_empty_answers():
    docs = [{"candidates": ["run", "walk"], "answer": "walk"}] * 3
    assert score("mvbench", docs, ["(B) walk", "", "A"])["mvbench_accuracy"] == 50.0


def test_mmstar_is_a_macro_average_over_l2_categories():
    docs = [{"category": "c1", "l2_category": "x", "answer": "A"}] * 3 + [{"category": "c1", "l2_category": "y",
                                                                         "answer": "B"}]
    out = score("mmstar", docs, ["A", "A", "A", "C"])
    assert out["average"] == 0.5  # l2 x: 1.0, l2 y: 0.0; the micro mean would be 0.75
    assert extract_letter("The answer is C") == "C" and extract_letter("B) because") == "B"


def test_seedbench_keeps_only_the_first_character():
    docs = [{"answer": "C", "data_type": "image"}, {"answer": "A", "data_type": "image"}]
    assert score("seedbench", docs, ["(C)", "A. cat"])["seed_image"] == 0.5


def test_unknown_task_and_length_mismatch():
    with pytest.raises(ValueError, match="pope"):
        score("popee", [], [])
    with pytest.raises(ValueError, match="2 docs but 1"):
        score("gqa", [{"answer": "a"}] * 2, ["a"])


def test_relative_performance_is_the_mean_of_ratios():
    from clse_exp.metrics.relative import relative_performance

    out = relative_performance({"mme": 1400.0, "gqa": 0.6}, {"mme": 1750.0, "gqa": 0.6, "pope": 0.8})
    assert out["per_benchmark"] == {"gqa": 1.0, "mme": 0.8} and out["mean"] == pytest.approx(0.9)
