"""Scorers by task name: `score(task, docs, predictions) -> dict`, metric keys as lmms-eval names them.

Docs are dicts of the dataset's columns (no images); predictions are raw model strings, stripped first
as lmms-eval does.
"""

from __future__ import annotations

from collections.abc import Callable

from clse_exp.metrics import exact_match, mmbench, mme, multiple_choice, ocrbench, synthetic, vqa, yes_no

SCORERS: dict[str, Callable[[list[dict], list[str]], dict]] = {
    "synthetic": synthetic.score,
    "pope": yes_no.pope,
    "pope_llava": yes_no.pope_llava,
    "mme": mme.mme,
    "gqa": exact_match.exact_match,
    "textvqa_val": vqa.vqa,
    "vizwiz_vqa_val": vqa.vqa,
    "scienceqa_img": multiple_choice.scienceqa,
    "mmbench_en_dev": mmbench.mmbench,
    "mmbench_cn_dev": mmbench.mmbench,
    "ocrbench": ocrbench.ocrbench,
    "mmstar": multiple_choice.mmstar,
    "seedbench": multiple_choice.seedbench,
    "videomme": multiple_choice.videomme,
    "mvbench": multiple_choice.mvbench,
}
TASKS = tuple(sorted(SCORERS))


def score(task: str, docs: list[dict], predictions: list[str]) -> dict:
    if task not in SCORERS:
        raise ValueError(f"task={task!r} has no scorer; choose one of: {', '.join(TASKS)}")
    if len(docs) != len(predictions):
        raise ValueError(f"{len(docs)} docs but {len(predictions)} predictions")
    return SCORERS[task](docs, [p.strip() for p in predictions])
