"""Relative performance as pruning papers report it: per benchmark pruned / unpruned, then their mean.

None of the papers' repos ships this computation; it is done in their tables. MME enters as the perception +
cognition total (the papers' MME column, about 1862 for LLaVA-1.5-7B): perception-only would not cancel in
the ratio. Pass `mme` directly, or `mme_perception_score` and `mme_cognition_score`, which are summed.
"""

from __future__ import annotations

_MME_PARTS = ("mme_perception_score", "mme_cognition_score")
NOTE = "MME counts as perception + cognition total; mean is the arithmetic mean of the per-benchmark ratios"


def _with_mme_total(scores: dict[str, float]) -> dict[str, float]:
    if "mme" in scores or not all(k in scores for k in _MME_PARTS):
        return dict(scores)
    merged = {k: v for k, v in scores.items() if k not in _MME_PARTS}
    merged["mme"] = sum(scores[k] for k in _MME_PARTS)
    return merged


def relative_performance(pruned: dict[str, float], unpruned: dict[str, float]) -> dict:
    """`per_benchmark`: pruned / unpruned for every benchmark in both dicts (1.0 = 100 %); `mean`: their mean;
    `skipped`: benchmarks in only one dict or with an unpruned score of 0; `note`: how MME counts."""
    pruned, unpruned = _with_mme_total(pruned), _with_mme_total(unpruned)
    ratios = {name: pruned[name] / unpruned[name] for name in sorted(set(pruned) & set(unpruned))
              if unpruned[name]}
    skipped = sorted((set(pruned) | set(unpruned)) - set(ratios))
    return {"per_benchmark": ratios, "mean": sum(ratios.values()) / len(ratios) if ratios else float("nan"),
            "skipped": skipped, "note": NOTE}
