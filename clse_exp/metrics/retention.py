"""The retention block of a run summary (ours and the lmms-eval model's), from per-sample records."""

from __future__ import annotations

from clse_exp.metrics.positions import positional_summary


def retention_summary(records: list[dict]) -> dict:
    """Retention averaged over the samples that have visual tokens, and how many samples had none.

    A text-only sample has nothing to prune; counted as retention 1.0 it would pull the run's average above
    what the method kept of every image, so it is counted apart (`text_only_samples`)."""
    if not records or "retention" not in records[0]:
        return {}
    visual = [r for r in records if r.get("n_visual")]
    summary: dict = {}
    if visual:
        summary = {k: sum(r["retention"][k] for r in visual) / len(visual) for k in visual[0]["retention"]}
        summary["visual_tokens_in"] = sum(r["n_visual"] for r in visual) / len(visual)
    summary["text_only_samples"] = len(records) - len(visual)
    summary.update(positional_summary(visual))
    return summary
