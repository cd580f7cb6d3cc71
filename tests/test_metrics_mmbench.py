"""MMBench CircularEval: a question is right only if every circular copy is right."""

from __future__ import annotations

from clse_exp.metrics import score
from clse_exp.metrics.mmbench import infer_option, options

OPTIONS = {"A": "red", "B": "blue", "C": "green", "D": "nan"}
ROWS = [  # (index, gold, prediction)
    (5, "A", "A"), (1_000_005, "B", "B."), (2_000_005, "C", "The answer is (C)"),  # all right -> hit
    (6, "A", "A"), (1_000_006, "B", "A"), (2_000_006, "C", "C"),                   # one copy wrong -> miss
    (7, "B", "It is blue"), (1_000_007, "C", "Answer:C"),                          # 2nd unreadable -> miss
    (8, "A", "A dog is red"), (1_000_008, "C", "green"),                          # text rule twice -> hit
    (1_000_009, "A", "D"),                                                        # no main row: ignored
]


def _docs():
    return [{**OPTIONS, "index": i, "answer": g} for i, g, _ in ROWS]


def test_one_wrong_copy_fails_the_question():
    out = score("mmbench_en_dev", _docs(), [p for *_, p in ROWS])
    # questions 5, 6, 7, 8: hit, miss, miss (judge would decide), hit -> 100 * 2 / 4
    assert out["gpt_eval_score"] == 50.0
    assert out["judge_rows"] == 1 and "GPT judge" in out["note"]  # only "Answer:C" would reach the judge
    assert score("mmbench_cn_dev", _docs(), [p for *_, p in ROWS])["gpt_eval_score"] == 50.0


def test_static_variant_reads_unreadable_rows_with_extract_letter():
    out = score("mmbench_en_dev_static", _docs(), [p for *_, p in ROWS])
    # "Answer:C" -> C by the answer phrase, so question 7 is a hit too: 100 * 3 / 4
    assert out["gpt_eval_score"] == 75.0 and out["judge_rows"] == 0


def test_can_infer_option_rules():
    assert infer_option("B") == "B" and infer_option("(C).") == "C" and infer_option(":D") == "D"
    assert infer_option("A dog is red") is None  # a lone "A" in > 3 tokens may be an article
    assert infer_option("A or B") is None        # two bare letters
    # no bare letter; forms are tried in order and "X." comes before "X,", so this reads as C
    assert infer_option("B, not C.") == "C"


def test_missing_and_none_options_are_dropped():
    # "nan" and NaN mean no option; the evaluator also drops an option literally named "None".
    assert options({"A": "x", "B": float("nan"), "C": "None", "D": "nan"}) == {"A": "x"}
