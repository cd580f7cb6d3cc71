"""Image multiple choice: ScienceQA-IMG, SEED-Bench, MMStar (HEAD and v0.3.0 rules), letter extraction."""

from __future__ import annotations

import pytest

from clse_exp.metrics import score
from clse_exp.metrics.mcq_extract import extract_letter

SQA_PREDS = ["B", "b", "B. dog", "(B)", "The answer is B", "b. dog", "C", ""]


def test_scienceqa_head_reads_the_letter_or_an_upper_case_letter_dot():
    docs = [{"answer": 1}] * len(SQA_PREDS)  # index 1 -> target "B"
    # right: "B", "b" (case-insensitive equality), "B. dog";
    # wrong: "(B)", "The answer is B", "b. dog", "C", ""
    assert score("scienceqa_img", docs, SQA_PREDS) == {"exact_match": 3 / 8}
    assert score("scienceqa", docs, SQA_PREDS) == {"exact_match": 3 / 8}  # FULL config, same rule


def test_scienceqa_legacy_only_takes_the_bare_letter():
    docs = [{"answer": 1}] * len(SQA_PREDS)
    # lower-cased first, so the "X." branch was dead: only "B" and "b" -> 2 / 8
    assert score("scienceqa_img_legacy", docs, SQA_PREDS) == {"exact_match": 2 / 8}


def test_seedbench_keeps_only_the_first_character():
    docs = [{"answer": a, "data_type": t} for a, t in (("C", "image"), ("A", "image"), ("B", "image"),
                                                       ("D", "video"))]
    out = score("seedbench", docs, ["(C)", "A. cat", "b", "D"])
    # image: "(" wrong, "A" right, "b" right (case-insensitive) -> 2/3; video 1/1; all 3/4
    assert out == {"seed_image": pytest.approx(2 / 3), "seed_video": 1.0, "seed_all": 0.75}


@pytest.mark.parametrize(("text", "letter"), [
    ("B", "B"), ("B) because", "B"), ("C: red", "C"),
    ("A photo of a cat", "A"),                        # starting with a letter outranks everything
    ("Based on the video, the answer is C.", "C"),    # ends with a letter; the "B" of "Based" never counts
    ("The answer is B because the dog runs", "B"),    # answer phrase
    ("(C) and (D) look close, maybe", "D"),           # "(X)": the last one wins
    ("Dogs and Cats", ""),
])
def test_extract_letter_priorities(text, letter):
    assert extract_letter(text) == letter


MMSTAR = [  # (category, l2_category, gold, prediction)
    ("coarse perception", "image style", "A", "A"),
    ("coarse perception", "image style", "A", "The answer is A"),
    ("coarse perception", "image style", "B", "(C)"),
    ("coarse perception", "image scene", "D", "**D**"),
    ("math", "numeric", "B", "Based on the chart, A"),
    ("math", "numeric", "C", "D"),
]


def _mmstar(task):
    docs = [{"category": c, "l2_category": l2, "answer": g} for c, l2, g, _ in MMSTAR]
    return score(task, docs, [p for *_, p in MMSTAR])


def test_mmstar_average_is_a_macro_mean_over_l2_categories():
    out = _mmstar("mmstar")
    # HEAD letters A, A, C | D | A, D -> style 2/3, scene 1, numeric 0
    assert out["average"] == pytest.approx((2 / 3 + 1 + 0) / 3)  # 5/9 = 0.556; the micro mean would be 3/6
    assert out["coarse perception"] == pytest.approx((2 / 3 + 1) / 2)  # 5/6
    assert out["math"] == 0.0


def test_mmstar_legacy_reads_the_first_character():
    out = _mmstar("mmstar_legacy")
    # style: "a" right, "the answer is a" right, "(c)" wrong -> 2/3; scene: "*" wrong -> 0;
    # numeric: "based ..." starts with "b" == gold "b" (quirk) right, "d" wrong -> 1/2
    assert out["average"] == pytest.approx((2 / 3 + 0 + 1 / 2) / 3)  # 7/18
    assert out["coarse perception"] == pytest.approx(1 / 3) and out["math"] == 0.5
