"""Video multiple choice: MVBench (empty answers leave the denominator), Video-MME (HEAD and v0.3.0), the EgoSchema
subset and LongVideoBench (their parsers' quirks; a letter they cannot read is lmms-eval's random draw, wrong here)."""

from __future__ import annotations

import pytest

from clse_exp.metrics import score
from clse_exp.metrics.video import egoschema_letter, longvideobench_letter, mvbench_option


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


# EgoSchema subset: lmms-eval@75571cfe0fa3:lmms_eval/tasks/egoschema/utils.py:93-175 (parser), 238-248 (score).
EGO_OPTIONS = ["A. cooks", "B. cleans", "C. reads", "D. paints", "E. sleeps"]


@pytest.mark.parametrize(("prediction", "letter"), [
    ("(B) cleans", "B"),
    ("'C'", "C"),                                   # ' is stripped from both ends, then "C " matches
    ("I think it is A.", "A"),
    ("A and B", "A"),                               # several: the earliest last occurrence
    ("(D) or (B)", "D"),
    ("DNA sample E.", "A"),                         # a plain substring test: "DNA " holds "A "
    ("C, because D. paints is wrong", "D"),         # "C," is no format, "D." is
    ("He did b. cleans then reads and more", "B"),  # > 5 words, no letter: the option text, prefix included
    ("c", None),                                    # lower case is no letter: lmms-eval draws at random
    ("E: sleeps", None),                            # "E:" is no format and 2 words are too few for the text
    ("The person cleans the room, mostly.", None),  # "B. cleans" (with its prefix) does not occur
])
def test_egoschema_letter_follows_lmms_evals_parser(prediction, letter):
    assert egoschema_letter(prediction, EGO_OPTIONS) == letter


def test_egoschema_subset_score_is_a_fraction_and_unparsed_answers_are_wrong():
    docs = [{"option": EGO_OPTIONS, "answer": a} for a in ("1", "3", 2, "0", "4")]
    preds = ["(B) cleans", "D.", "C", "c", "DNA sample E."]  # right, right, right (int answer), random, A
    assert score("egoschema_subset", docs, preds) == {"score": 0.6, "egoschema_unparsed": 1}


def test_egoschema_rows_without_answers_are_refused():
    with pytest.raises(ValueError, match="egoschema_subset"):
        score("egoschema_subset", [{"option": EGO_OPTIONS, "answer": None}], ["A"])
    with pytest.raises(ValueError, match="5 options"):
        egoschema_letter("A", EGO_OPTIONS[:4])


# LongVideoBench: lmms-eval@75571cfe0fa3:lmms_eval/tasks/longvideobench/utils.py:187-213 (parser), 263-308 (lvb_acc).
@pytest.mark.parametrize(("prediction", "letter"), [
    ("The answer is C", "C"),
    ("The best answer is (D).", "D"),
    ("The answer: A", "A"),              # "The answer" is deleted
    ("Answer: B", "A"),                  # the first capital A-E anywhere: the A of "Answer"
    ("Based on the video, C", "B"),
    ("E", "E"),                          # E counts even when there are 4 options
    ("none of them", None),              # no A-E: lmms-eval draws at random
    ("a b c d e f g h i j k l", None),   # > 10 words and no A-E: random as well
])
def test_longvideobench_letter_follows_lmms_evals_parser(prediction, letter):
    assert longvideobench_letter(prediction) == letter


def test_longvideobench_lvb_acc_is_the_rounded_fraction_with_duration_breakdown():
    docs = [{"correct_choice": c, "duration_group": g, "question_category": q}
            for c, g, q in [(2, 15, "S2E"), (0, 15, "T3O"), (1, 600, "S2E"), (3, 3600, "E2O"), (0, 3600, "E2O"),
                            (4, 60, "TOS")]]
    preds = ["The answer is C", "Answer: B", "Based on it", "none", "D", "E"]  # right, A right, B right, -, -, right
    assert score("longvideobench_val_v", docs, preds) == {
        "lvb_acc": 0.66667, "lvb_unparsed": 1, "lvb_acc_15": 1.0, "lvb_acc_3600": 0.0, "lvb_acc_60": 1.0,
        "lvb_acc_600": 1.0}
