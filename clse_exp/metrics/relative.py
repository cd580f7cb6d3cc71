"""Relative performance as pruning papers report it: per benchmark pruned / unpruned, then the mean.

Pass MME as the perception + cognition total (`mme_total_score`): the papers' MME column is the total, and
perception-only would not cancel in the ratio.
"""

from __future__ import annotations


def relative_performance(pruned: dict[str, float], unpruned: dict[str, float]) -> dict:
    shared = sorted(set(pruned) & set(unpruned))
    ratios = {name: pruned[name] / unpruned[name] for name in shared if unpruned[name]}
    return {"per_benchmark": ratios, "mean": sum(ratios.values()) / len(ratios) if ratios else float("nan"),
            "note": "MME enters as perception + cognition total"}
