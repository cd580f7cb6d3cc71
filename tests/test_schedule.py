"""Specification of the keep budget -> per-stage token counts (clse_exp.pruning.schedule)."""

from __future__ import annotations

import math

import pytest

from clse_exp.pruning.schedule import (
    Stage,
    UnreachableBudget,
    achieved_retention,
    plan_stages,
    visual_tokens_per_layer,
)

LLAVA = {"n_visual": 576, "num_layers": 32, "prune_layers": [1, 11, 21]}
QWEN2VL = {"n_visual": 1024, "num_layers": 28, "prune_layers": [1, 10, 19]}
CLSE_SHAPE = (1.71, 1.08, 0.294)  # CLSE's stage shape (clse_exp.pruning.methods.clse passes it to the planner)


def counts(stages: list[Stage]) -> list[int]:
    return [stage.count for stage in stages]


def layers(stages: list[Stage]) -> list[int]:
    return [stage.layer for stage in stages]


# ---------------------------------------------------------------- budget=average


@pytest.mark.parametrize("average, expected", [(192, 166), (128, 98), (64, 30)])
def test_single_stage_average_matches_fastv_equal_flops_counts(average, expected):
    # FastV at K=2 in LLaVA-1.5 must keep 166 / 98 / 30 tokens to average 192 / 128 / 64 (baselines.md)
    stages = plan_stages(576, 32, [2], keep=average / 576)
    assert stages == [Stage(2, expected)]


@pytest.mark.parametrize("keep", [0.07, 0.1, 0.2, 0.25, 1 / 3, 0.5, 0.77, 0.99])
def test_single_stage_average_is_the_nearest_attainable(keep):
    n, num_layers, first = 576, 32, 2
    (stage,) = plan_stages(n, num_layers, [first], keep=keep)
    step = (num_layers - first) / (num_layers * n)  # one token more in every layer after the cut
    assert abs(achieved_retention(n, num_layers, [stage])["average"] - keep) <= step / 2 + 1e-12


@pytest.mark.parametrize("setup", [LLAVA, QWEN2VL], ids=["llava", "qwen2vl"])
@pytest.mark.parametrize("keep", [0.09, 0.112, 0.2, 0.223, 0.25, 1 / 3, 0.5, 0.75])
def test_three_stage_average_is_as_close_as_integers_allow(setup, keep):
    n, num_layers, prune_layers = setup["n_visual"], setup["num_layers"], setup["prune_layers"]
    stages = plan_stages(**setup, keep=keep, shape=CLSE_SHAPE)
    # the layer total moves in steps of the layers each stage spans; its gcd is the finest reachable step
    spans = [b - a for a, b in zip(prune_layers, prune_layers[1:] + [num_layers], strict=True)]
    finest = math.gcd(*spans) / (num_layers * n)
    assert abs(achieved_retention(n, num_layers, stages)["average"] - keep) <= finest / 2 + 1e-12
    assert layers(stages) == prune_layers


@pytest.mark.parametrize("setup", [LLAVA, QWEN2VL], ids=["llava", "qwen2vl"])
@pytest.mark.parametrize("average", [64, 128, 192])
def test_average_follows_the_clse_shape_within_a_few_tokens(setup, average):
    n, num_layers, prune_layers = setup["n_visual"], setup["num_layers"], setup["prune_layers"]
    keep = average / 576
    spans = [b - a for a, b in zip(prune_layers, prune_layers[1:] + [num_layers], strict=True)]
    shape = list(CLSE_SHAPE)
    # the real-valued scale whose shape-proportional counts hit the budget exactly
    scale = (keep * num_layers - prune_layers[0]) / sum(w * f for w, f in zip(spans, shape, strict=True))
    ideal = [scale * f * n for f in shape]
    # hitting the budget to the token-layer may shift a count by up to half the spans' period (5 here)
    assert all(abs(c - x) <= 6 for c, x in zip(counts(plan_stages(**setup, keep=keep, shape=shape)), ideal,
                                                   strict=True))


def test_average_with_pdrop_shape():
    stages = plan_stages(576, 32, [8, 16, 24], keep=0.4, shape=[0.5, 0.25, 0.125])
    first, second, last = counts(stages)
    assert first / last == pytest.approx(4, rel=0.05) and second / last == pytest.approx(2, rel=0.05)


@pytest.mark.parametrize("keep", [0.1, 0.2, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("prune_layers", [[0, 4], [1, 11, 21], [2, 8, 16, 24]])
def test_counts_are_non_increasing_and_in_range(keep, prune_layers):
    stages = plan_stages(576, 32, prune_layers, keep=keep)
    values = counts(stages)
    assert all(1 <= c <= 576 for c in values)
    assert values == sorted(values, reverse=True)


def test_keep_all_is_identity():
    assert counts(plan_stages(**LLAVA, keep=1.0)) == [576, 576, 576]
    assert counts(plan_stages(**LLAVA, keep=1.0, budget="final")) == [576, 576, 576]


def test_too_small_keep_names_the_minimum():
    # layers 0..7 see all 576 tokens, later ones at least 1: (8 * 576 + 24) / (32 * 576) = 0.251302
    with pytest.raises(UnreachableBudget, match=r"keep=0\.2 .*0\.251302"):
        plan_stages(576, 32, [8, 16, 24], keep=0.2, shape=[0.5, 0.25, 0.125])
    with pytest.raises(ValueError, match=r"keep=0\.05 .*0\.06"):
        plan_stages(576, 32, [2], keep=0.05)  # below 2/32: layers 0 and 1 see every token


# ---------------------------------------------------------------- budget=final


def test_final_budget_pdrop_shape():
    stages = plan_stages(576, 32, [8, 16, 24], keep=0.125, budget="final", shape=[0.5, 0.25, 0.125])
    assert stages == [Stage(8, 288), Stage(16, 144), Stage(24, 72)]
    assert achieved_retention(576, 32, stages)["final"] == 0.125


def test_final_budget_single_stage_keeps_at_least_one():
    assert plan_stages(576, 32, [2], keep=0.25, budget="final") == [Stage(2, 144)]
    assert plan_stages(576, 32, [2], keep=1e-4, budget="final") == [Stage(2, 1)]


# ---------------------------------------------------------------- per-layer accounting


def test_visual_tokens_per_layer_by_hand():
    stages = [Stage(1, 6), Stage(4, 2)]
    assert visual_tokens_per_layer(10, 6, stages) == [10, 6, 6, 6, 2, 2]
    retention = achieved_retention(10, 6, stages)
    assert retention["average"] == pytest.approx(32 / 60)
    assert retention["final"] == pytest.approx(0.2)


def test_stage_at_layer_zero_cuts_every_layer():
    assert visual_tokens_per_layer(8, 3, [Stage(0, 4)]) == [4, 4, 4]
    assert visual_tokens_per_layer(8, 3, []) == [8, 8, 8]


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prune_layers": [11, 1, 21]}, "strictly increasing"),
        ({"prune_layers": [1, 1, 21]}, "strictly increasing"),
        ({"prune_layers": [1, 11, 32]}, r"0\.\.31"),
        ({"keep": 0.0}, r"keep=0\.0 is outside \(0, 1\]"),
        ({"keep": 1.5}, r"keep=1\.5 is outside"),
        ({"budget": "mean"}, "budget='mean'.*average, final"),
        ({"shape": [1.0, 0.5]}, "3 prune layers"),
        ({"shape": [0.2, 0.5, 1.0]}, "non-increasing"),
    ],
)
def test_bad_inputs_are_named(kwargs, message):
    args = {**LLAVA, "keep": 0.3, **kwargs}
    with pytest.raises(ValueError, match=message):
        plan_stages(**args)
