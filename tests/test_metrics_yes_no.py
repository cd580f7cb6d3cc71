"""POPE: lmms-eval's pooled exact-string scoring, and the LLaVA protocol (`pope_llava`)."""

from __future__ import annotations

import pytest

from clse_exp.metrics import score
from clse_exp.metrics.yes_no import llava_label


def test_pope_yes_dot_is_neither_yes_nor_no_and_case_is_ignored():
    golds = ["yes", "yes", "yes", "no", "no", "no", "yes"]
    preds = ["Yes.", "YES", "  yes ", "no", "Yes", "No.", "no"]
    out = score("pope", [{"answer": g} for g in golds], preds)
    # lower+strip then ==: hits are rows 1, 2, 3 -> 3/7 ("yes." and "no." match nothing).
    assert out["pope_accuracy"] == pytest.approx(3 / 7)
    # TP = rows 1, 2; FP = row 4; FN = row 6 only ("yes." with gold yes is not a "no") -> P = R = 2/3.
    assert out["pope_precision"] == pytest.approx(2 / 3)
    assert out["pope_recall"] == pytest.approx(2 / 3)
    assert out["pope_f1_score"] == pytest.approx(2 / 3)  # 2PR/(P+R) with P = R
    # From the GOLD (4 yes of 7), not from the predictions (3 exact "yes" of 7).
    assert out["pope_yes_ratio"] == pytest.approx(4 / 7)


def test_pope_without_positive_predictions_scores_zero_not_nan():
    out = score("pope", [{"answer": "yes"}, {"answer": "no"}], ["Yes.", "no"])
    # TP + FP = 0 -> precision 0; TP + FN = 0 -> recall 0; F1 0; accuracy 1/2.
    assert (out["pope_precision"], out["pope_recall"], out["pope_f1_score"]) == (0.0, 0.0, 0.0)
    assert out["pope_accuracy"] == 0.5


def test_pope_rejects_a_gold_that_is_not_yes_or_no():
    with pytest.raises(ValueError, match="maybe"):
        score("pope", [{"answer": "maybe"}], ["yes"])


def test_llava_label_reads_the_first_sentence_word_by_word():
    assert llava_label("There is no dog. Yes") == "no"
    assert llava_label("Yes, there is not.") == "no"  # comma dropped: "not" is a word
    assert llava_label("No!") == "yes"                # "No!" is not the word "No"
    assert llava_label("Not sure") == "yes"           # "Not" is not in {No, not, no}
    assert llava_label("Yes. But no") == "yes"        # only the first sentence counts


def test_pope_llava_is_the_mean_f1_of_the_three_splits():
    rows = [("adversarial", "yes", "Yes, there is."), ("adversarial", "no", "No!"),
            ("adversarial", "no", "There is no dog."), ("adversarial", "yes", "Not sure"),
            ("popular", "yes", "no"), ("popular", "no", "I do not see one. Yes"),
            ("random", "yes", "yes"), ("random", "no", "No, there is not.")]
    out = score("pope_llava", [{"category": c, "answer": a} for c, a, _ in rows], [p for *_, p in rows])
    # adversarial labels yes, yes, no, yes vs gold yes, no, no, yes: TP 2, FP 1, FN 0 -> P 2/3, R 1, F1 0.8
    assert out["pope_llava_adversarial_f1"] == pytest.approx(0.8)
    assert out["pope_llava_adversarial_accuracy"] == 0.75
    # popular labels no, no vs gold yes, no: TP 0 -> F1 0; accuracy 1/2
    assert out["pope_llava_popular_f1"] == 0.0
    # random labels yes, no: perfect
    assert out["pope_llava_random_f1"] == 1.0
    assert out["pope_llava_f1_mean"] == pytest.approx((0.8 + 0 + 1) / 3)  # 0.6
    assert out["pope_llava_accuracy_mean"] == pytest.approx((0.75 + 0.5 + 1) / 3)  # 0.75
    assert out["pope_llava_yes_ratio"] == 0.5  # predicted yes: 3 + 0 + 1 of 8
