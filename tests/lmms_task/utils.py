"""Prompt and scoring of the clse_synthetic lmms-eval task: those of our synthetic task."""

from __future__ import annotations

from PIL import Image

from clse_exp.metrics.synthetic import normalize_answer


def doc_to_visual(doc: dict) -> list[Image.Image]:
    return [doc["image"].convert("RGB")]


def doc_to_text(doc: dict) -> str:
    return doc["question"]  # the question with its instruction, as clse_exp.data.synthetic builds it


def process_results(doc: dict, results: list[str]) -> dict:
    return {"accuracy": float(normalize_answer(results[0]) == normalize_answer(doc["answer"]))}
