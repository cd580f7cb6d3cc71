"""Benchmark scorers by task name: `score(task, docs, predictions) -> dict`.

Task names and metric keys are lmms-eval's; where the pruning papers used another protocol it is a named
variant (`pope_llava`, `textvqa_val_ocr`), and `*_legacy` is lmms-eval v0.3.0's rule where HEAD changed it.
Docs are dicts of the dataset's columns (no images needed); predictions are raw model strings, stripped
first as lmms-eval does. The shared benchmarks.md spec states each rule and its lmms-eval source.
"""

from __future__ import annotations

from collections.abc import Callable

from clse_exp.metrics import (
    exact_match,
    mmbench,
    mme,
    multiple_choice,
    ocrbench,
    synthetic,
    video,
    vqa,
    yes_no,
)
from clse_exp.metrics.relative import relative_performance

Scorer = Callable[[list[dict], list[str]], dict]

SCORERS: dict[str, Scorer] = {
    "egoschema_subset": video.egoschema_subset,  # the full `egoschema` test has no public answers: not offered
    "gqa": exact_match.exact_match,
    "longvideobench_val_v": video.longvideobench,
    "mmbench_cn_dev": mmbench.mmbench,
    "mmbench_en_dev": mmbench.mmbench,
    "mmbench_en_dev_static": mmbench.mmbench_static,
    "mme": mme.mme,
    "mmstar": multiple_choice.mmstar,
    "mmstar_legacy": multiple_choice.mmstar_legacy,
    "mvbench": video.mvbench,
    "ocrbench": ocrbench.ocrbench,
    "ocrbench_legacy": ocrbench.ocrbench_legacy,
    "pope": yes_no.pope,
    "pope_llava": yes_no.pope_llava,
    "scienceqa": multiple_choice.scienceqa,  # ScienceQA-FULL (CLSE's list): same rule as the IMG subset
    "scienceqa_img": multiple_choice.scienceqa,
    "scienceqa_img_legacy": multiple_choice.scienceqa_legacy,
    "seedbench": multiple_choice.seedbench,
    "synthetic": synthetic.score,
    "textvqa_val": vqa.vqa,
    "textvqa_val_ocr": vqa.vqa,  # LLaVA's OCR-token prompt; the m4c evaluator computes the same accuracy
    "videomme": video.videomme,
    "videomme_legacy": video.videomme_legacy,
    "vizwiz_vqa_val": vqa.vqa,
}
TASKS: tuple[str, ...] = tuple(sorted(SCORERS))
# Tasks whose headline metric is a mean over samples: one sample's score is that metric on the sample alone.
PER_SAMPLE_METRIC = {
    "synthetic": "accuracy", "gqa": "exact_match", "textvqa_val": "exact_match", "textvqa_val_ocr": "exact_match",
    "vizwiz_vqa_val": "exact_match", "scienceqa": "exact_match", "scienceqa_img": "exact_match",
    "scienceqa_img_legacy": "exact_match", "seedbench": "seed_all", "egoschema_subset": "score",
    "longvideobench_val_v": "lvb_acc",
}

__all__ = ["SCORERS", "TASKS", "relative_performance", "sample_score", "score"]


def score(task: str, docs: list[dict], predictions: list[str]) -> dict:
    """The task's metrics for `predictions[i]` answering `docs[i]`."""
    if task not in SCORERS:
        raise ValueError(f"task={task!r} has no scorer; choose one of: {', '.join(TASKS)}")
    if len(docs) != len(predictions):
        raise ValueError(f"{len(docs)} docs but {len(predictions)} predictions")
    if not docs:
        raise ValueError(f"task={task!r}: no predictions to score")
    return SCORERS[task](docs, [p.strip() for p in predictions])


def sample_score(task: str, doc: dict, prediction: str) -> float | None:
    """One sample's score by the task's own rule, where the task's metric is a per-sample mean; None for
    tasks scored over sets (F1, paired or circular questions), which have no per-sample score."""
    metric = PER_SAMPLE_METRIC.get(task)
    return None if metric is None else float(score(task, [doc], [prediction])[metric])
