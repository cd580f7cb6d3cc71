"""Relative performance: mean of pruned / unpruned, MME as perception + cognition."""

from __future__ import annotations

import math

import pytest

from clse_exp.metrics import relative_performance


def test_mean_of_ratios_with_mme_summed_from_its_parts():
    pruned = {"mme_perception_score": 1400.0, "mme_cognition_score": 300.0, "gqa": 0.6, "pope": 0.76}
    unpruned = {"mme_perception_score": 1500.0, "mme_cognition_score": 500.0, "gqa": 0.6, "pope": 0.8,
                "sqa": 0.7}
    out = relative_performance(pruned, unpruned)
    # mme 1700 / 2000 = 0.85 (perception alone would give 0.933); gqa 1.0; pope 0.95; mean 2.8 / 3
    assert out["per_benchmark"] == pytest.approx({"gqa": 1.0, "mme": 0.85, "pope": 0.95})
    assert out["mean"] == pytest.approx(2.8 / 3)
    assert out["skipped"] == ["sqa"] and "perception + cognition" in out["note"]


def test_zero_baseline_is_skipped_and_nothing_shared_is_nan():
    out = relative_performance({"gqa": 0.5, "mme": 1000.0}, {"gqa": 0.0, "mme": 2000.0})
    assert out["per_benchmark"] == {"mme": 0.5} and out["skipped"] == ["gqa"]
    assert math.isnan(relative_performance({"a": 1.0}, {"b": 1.0})["mean"])
