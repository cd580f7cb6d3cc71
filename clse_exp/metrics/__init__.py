"""Scorers by task name: `score(task, docs, predictions) -> dict` (metric keys as lmms-eval names them)."""

from __future__ import annotations

from collections.abc import Callable

from clse_exp.metrics import synthetic

SCORERS: dict[str, Callable[[list[dict], list[str]], dict]] = {"synthetic": synthetic.score}
TASKS = tuple(sorted(SCORERS))


def score(task: str, docs: list[dict], predictions: list[str]) -> dict:
    if task not in SCORERS:
        raise ValueError(f"task={task!r} has no scorer; choose one of: {', '.join(TASKS)}")
    return SCORERS[task](docs, predictions)
