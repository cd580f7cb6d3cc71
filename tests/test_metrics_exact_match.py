"""GQA: lmms-eval's exact_match with ignore_case and ignore_punctuation only."""

from __future__ import annotations

import pytest

from clse_exp.metrics import score


def test_gqa_ignores_case_and_punctuation_and_nothing_else():
    docs = [{"answer": a} for a in ("table", "table", "red", "yes", "t-shirt")]
    preds = ["Table.", "the table", "red .", "Yes!", "tshirt"]
    # "table" ok; "the table" (no article rule) wrong; "red ." -> "red " (inner space kept) wrong;
    # "yes" ok; gold "t-shirt" -> "tshirt" ok. 3 / 5
    assert score("gqa", docs, preds) == {"exact_match": pytest.approx(0.6)}


def test_the_pipeline_strip_happens_before_scoring():
    assert score("gqa", [{"answer": "red"}], ["  red \n"]) == {"exact_match": 1.0}
