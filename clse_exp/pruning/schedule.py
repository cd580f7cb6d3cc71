"""From the `keep` budget to per-stage visual-token counts (the planner every method shares).

Budget semantics (the same everywhere in clse-exp):
- `budget="average"`: `keep` in (0, 1] is the fraction of visual tokens kept averaged over ALL decoder
  layers, layers before the first cut counting as 1.0. This is the equal-FLOPs budget: single-stage and
  multi-stage methods at the same `keep` do the same LLM work.
- `budget="final"`: `keep` is the fraction of visual tokens left after the last cut.
- `schedule="paper"`: the method's official count rule (e.g. the CLSE per-stage tables), even under the
  uniform protocol; `achieved_retention` reports what average that really gives.
Methods with an official count rule of their own apply it under `protocol=official` (see each method).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise

from clse_exp.errors import ConfigError, choose_one

BUDGETS = ("average", "final")
SCHEDULES = ("auto", "paper")


class UnreachableBudget(ConfigError):
    """This image has too few visual tokens for the budget (one token per stage is the floor)."""


@dataclass(frozen=True)
class Stage:
    """One cut: before decoder `layer` (0 = at the LLM input), `count` visual tokens per sample survive."""

    layer: int  # the stage runs before this decoder layer (0 = at the LLM input)
    count: int  # visual tokens kept after the stage, per sample (counts of the ORIGINAL n_visual)


def check_budget(keep: float, budget: str, schedule: str, shape: Sequence[float] | None) -> None:
    """The checks that need no model: keep in (0, 1], known budget and schedule, a valid stage shape."""
    if isinstance(keep, bool) or not isinstance(keep, int | float) or not (0.0 < keep <= 1.0):
        raise ConfigError(f"keep={keep} is outside (0, 1]: it is the fraction of visual tokens kept")
    choose_one("budget", budget, BUDGETS)
    choose_one("schedule", schedule, SCHEDULES)
    if shape is not None:
        values = [float(value) for value in shape]
        # a growing shape would ask a later cut to bring tokens back
        if not values or any(not (math.isfinite(v) and v > 0) for v in values) or any(
                a < b for a, b in pairwise(values)):
            raise ConfigError(f"prune.shape={list(shape)} must be positive and non-increasing (relative stage "
                              "sizes, one per prune layer)")


def plan_stages(
    n_visual: int,
    num_layers: int,
    prune_layers: Sequence[int],
    keep: float,
    budget: str = "average",
    shape: Sequence[float] | None = None,
) -> list[Stage]:
    """The stages that realise `keep` for `n_visual` visual tokens in a decoder of `num_layers` layers.

    `keep` is the fraction of visual tokens kept averaged over all decoder layers (`budget="average"`,
    layers before the first cut count as 1.0) or left after the last cut (`budget="final"`). `shape` gives
    the relative sizes of the stages (default: halving, [1, 1/2, 1/4, ...]; methods pass their own).
    Counts are non-increasing, each in [1, n_visual]. Raises UnreachableBudget when even one token per
    stage exceeds the budget.
    """
    _check_plan_inputs(n_visual, num_layers, prune_layers, keep, budget)
    layers = [int(layer) for layer in prune_layers]
    shape = _stage_shape(shape, len(layers))
    if budget == "final":
        counts = _final_counts(n_visual, keep, shape)
    else:
        counts = _average_counts(n_visual, num_layers, layers, keep, shape)
    return [Stage(layer, count) for layer, count in zip(layers, counts, strict=True)]


def visual_tokens_per_layer(n_visual: int, num_layers: int, stages: Sequence[Stage]) -> list[int]:
    """For every decoder layer 0..num_layers-1, how many visual tokens it processes (per sample)."""
    _check_stages(n_visual, num_layers, stages)
    tokens = [n_visual] * num_layers
    for stage in stages:
        tokens[stage.layer :] = [stage.count] * (num_layers - stage.layer)
    return tokens


def achieved_retention(n_visual: int, num_layers: int, stages: Sequence[Stage]) -> dict:
    """{"average": layer-averaged visual tokens / n_visual, "final": tokens after the last cut / n_visual}."""
    tokens = visual_tokens_per_layer(n_visual, num_layers, stages)
    return {"average": sum(tokens) / (num_layers * n_visual), "final": tokens[-1] / n_visual}


def _check_plan_inputs(n_visual: int, num_layers: int, prune_layers: Sequence[int], keep: float, budget: str) -> None:
    if n_visual < 1 or num_layers < 1:
        raise ValueError(f"n_visual={n_visual} and num_layers={num_layers} must both be >= 1")
    check_budget(keep, budget, "auto", None)
    layers = list(prune_layers)
    if not layers:
        raise ConfigError("prune_layers is empty: a pruning schedule needs at least one stage layer")
    if any(not 0 <= layer < num_layers for layer in layers):
        raise ConfigError(
            f"prune_layers={layers} must lie in 0..{num_layers - 1} (the model has {num_layers} layers)"
        )
    if any(a >= b for a, b in pairwise(layers)):
        raise ConfigError(f"prune_layers={layers} must be strictly increasing")


def _check_stages(n_visual: int, num_layers: int, stages: Sequence[Stage]) -> None:
    layers = [stage.layer for stage in stages]
    if any(not 0 <= layer < num_layers for layer in layers) or any(a >= b for a, b in pairwise(layers)):
        raise ValueError(f"stage layers {layers} must be strictly increasing within 0..{num_layers - 1}")
    if any(not 1 <= stage.count <= n_visual for stage in stages):
        raise ValueError(f"stage counts {[s.count for s in stages]} must lie in [1, n_visual={n_visual}]")


def _stage_shape(shape: Sequence[float] | None, n_stages: int) -> list[float]:
    """The relative stage sizes: given, or the default for this many stages."""
    if shape is None:
        return [0.5**i for i in range(n_stages)]
    shape = [float(value) for value in shape]
    if len(shape) != n_stages:
        raise ConfigError(f"prune.shape={shape} has {len(shape)} entries but there are {n_stages} prune layers")
    check_budget(1.0, "average", "auto", shape)
    return shape


def _final_counts(n_visual: int, keep: float, shape: list[float]) -> list[int]:
    """The last stage keeps round(keep * n); earlier stages are that times their shape ratio to the last."""
    last = max(1, round(keep * n_visual))
    earlier = [min(n_visual, max(last, round(keep * n_visual * s / shape[-1]))) for s in shape[:-1]]
    return earlier + [last]


def _average_counts(
    n_visual: int, num_layers: int, layers: list[int], keep: float, shape: list[float]
) -> list[int]:
    """Counts whose exact layer-averaged retention is as close to `keep` as integers allow."""

    def token_layers(counts: Sequence[int]) -> int:
        stages = [Stage(layer, count) for layer, count in zip(layers, counts, strict=True)]
        return sum(visual_tokens_per_layer(n_visual, num_layers, stages))

    smallest = token_layers([1] * len(layers)) / (num_layers * n_visual)
    if keep < smallest - 1e-9:
        raise UnreachableBudget(
            f"keep={keep} is below {smallest:.6f}, the smallest average retention that "
            f"prune_layers={layers} allow in {num_layers} layers "
            f"(layers before {layers[0]} see all {n_visual} visual tokens)"
        )
    if keep == 1.0:
        return [n_visual] * len(layers)
    if len(layers) == 1:
        first = layers[0]
        count = round((keep * num_layers * n_visual - first * n_visual) / (num_layers - first))
        return [min(n_visual, max(1, count))]
    target = keep * num_layers * n_visual
    counts = _bisect_scale(n_visual, shape, target, token_layers)
    return _nudge_towards(counts, n_visual, target, token_layers)


def _scaled_counts(scale: float, shape: list[float], n_visual: int) -> list[int]:
    # shape is non-increasing and rounding and clamping are monotone, so these counts are non-increasing
    return [min(n_visual, max(1, round(scale * s * n_visual))) for s in shape]


def _bisect_scale(
    n_visual: int, shape: list[float], target: float, token_layers: Callable[[Sequence[int]], int]
) -> list[int]:
    """Scaled-shape counts on whichever side of `target` is closer; token_layers grows with the scale."""
    low, high = 0.0, 1.0 / min(shape)  # at `high` every stage keeps n_visual
    for _ in range(60):
        middle = (low + high) / 2
        if token_layers(_scaled_counts(middle, shape, n_visual)) < target:
            low = middle
        else:
            high = middle
    below, above = _scaled_counts(low, shape, n_visual), _scaled_counts(high, shape, n_visual)
    return min((below, above), key=lambda counts: abs(token_layers(counts) - target))


def _nudge_towards(
    counts: list[int], n_visual: int, target: float, token_layers: Callable[[Sequence[int]], int]
) -> list[int]:
    """Local search from the scaled-shape counts: move single tokens (one stage, or one stage up and another
    down) while that brings the layer total closer to `target`; between equally close totals, prefer the
    smallest relative departure from the starting counts, so small late stages keep their shape."""

    def key(candidate: list[int]) -> tuple[float, float]:
        departure = sum(abs(c - start) / start for c, start in zip(candidate, counts, strict=True))
        return abs(token_layers(candidate) - target), departure

    def valid(candidate: list[int]) -> bool:
        in_range = all(1 <= c <= n_visual for c in candidate)
        return in_range and all(a >= b for a, b in pairwise(candidate))

    best = list(counts)
    while True:
        moves = [(i, d, None) for i in range(len(best)) for d in (-1, 1)]
        moves += [(i, 1, j) for i in range(len(best)) for j in range(len(best)) if i != j]
        candidates = [c for c in (_moved(best, *move) for move in moves) if valid(c)]
        candidate = min(candidates, key=key, default=best)
        # the key falls strictly at every step over a finite set of counts, so this ends
        if key(candidate) >= key(best):
            return best
        best = candidate


def _moved(counts: list[int], i: int, delta: int, j: int | None) -> list[int]:
    moved = list(counts)
    moved[i] += delta
    if j is not None:
        moved[j] -= delta
    return moved
