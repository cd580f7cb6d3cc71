"""Prompt, choices and scoring of the clse_synthetic lmms-eval tasks: those of our synthetic task."""

from __future__ import annotations

from PIL import Image

from clse_exp.data.synthetic import COLOURS, SHAPES
from clse_exp.metrics.synthetic import normalize_answer


def doc_to_visual(doc: dict) -> list[Image.Image]:
    return [doc["image"].convert("RGB")]


def doc_to_text(doc: dict) -> str:
    return doc["question"]  # the question with its instruction, as clse_exp.data.synthetic builds it


def process_results(doc: dict, results: list[str]) -> dict:
    return {"accuracy": float(normalize_answer(results[0]) == normalize_answer(doc["answer"]))}


def doc_to_choice(doc: dict) -> list[str]:
    """Every answer the question's type allows (clse_synthetic_mc)."""
    return list(COLOURS) if doc["question"].startswith("What colour") else list(SHAPES)


def doc_to_target(doc: dict) -> int:
    return doc_to_choice(doc).index(doc["answer"])
