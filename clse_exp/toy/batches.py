"""Teacher-forced training batches: the run's own chat prompt, then the answer and <|im_end|>."""

from __future__ import annotations

from typing import Any

import torch

from clse_exp.data.sample import Sample
from clse_exp.data.synthetic import COLOURS, SHAPES
from clse_exp.models.base import ModelAdapter


def training_batch(adapter: ModelAdapter, processor: Any, samples: list[Sample]) -> dict[str, torch.Tensor]:
    """Inputs whose labels cover only the answer tokens and the end-of-turn token (-100 elsewhere).

    The prompt is exactly what evaluation feeds the model (`adapter.build_messages` + generation prompt),
    so the toy learns the format the runner uses.
    """
    tokenizer = processor.tokenizer
    end = tokenizer.eos_token
    prompts = [processor.apply_chat_template(adapter.build_messages(s), tokenize=False, add_generation_prompt=True)
               for s in samples]
    texts = [p + s.answer + end for p, s in zip(prompts, samples, strict=True)]
    tokenizer.padding_side = "left"
    inputs = processor(text=texts, images=[img for s in samples for img in s.images], padding=True,
                       return_tensors="pt")
    labels = torch.full_like(inputs["input_ids"], -100)
    for row, sample in enumerate(samples):
        target = tokenizer(sample.answer + end, add_special_tokens=False)["input_ids"]
        tail = inputs["input_ids"][row, -len(target):]
        if tail.tolist() != target:
            raise ValueError(f"answer {sample.answer!r} does not tokenize on its own at the end of the prompt")
        labels[row, -len(target):] = tail
    inputs["labels"] = labels
    return dict(inputs)


def evidence_targets(inputs: dict, samples: list[Sample], image_token_id: int, grid: int) -> torch.Tensor:
    """Per sample, a distribution over the sequence: uniform on the visual tokens of the evidence cells.

    Rows without evidence are all zero (no supervision). Assumes one image per sample, its merged tokens in
    raster order on a square grid that the cell grid divides (the toy's 6 x 6 tokens for a 3 x 3 grid).
    """
    ids = inputs["input_ids"]
    targets = torch.zeros(ids.shape, dtype=torch.float32)
    for row, sample in enumerate(samples):
        positions = (ids[row] == image_token_id).nonzero().flatten()
        side = int(len(positions) ** 0.5)
        if side * side != len(positions) or side % grid:
            raise ValueError(f"{len(positions)} visual tokens do not tile a {grid} x {grid} grid")
        evidence = set(sample.meta.get("evidence", []))
        for index, cell in enumerate(token_cells(side, grid)):
            if cell in evidence:
                targets[row, positions[index]] = 1.0
    total = targets.sum(-1, keepdim=True)
    return torch.where(total > 0, targets / total.clamp(min=1), targets)


def answer_query_index(labels: torch.Tensor) -> torch.Tensor:
    """Per row, the position whose output predicts the first answer token (the one before it)."""
    first = (labels != -100).float().argmax(-1)
    return first - 1


def cell_labels(samples: list[Sample], tokens_per_side: int, grid: int) -> torch.Tensor:
    """Per merged visual token (samples in order, raster within each image): [colour, shape] class of its cell,
    with len(COLOURS) / len(SHAPES) meaning an empty cell."""
    colours, shapes = list(COLOURS), list(SHAPES)
    empty = (len(colours), len(shapes))
    rows = []
    for sample in samples:
        cells = {(s["row"], s["col"]): (colours.index(s["colour"]), shapes.index(s["shape"]))
                 for s in sample.meta["scene"]}
        rows += [cells.get(cell, empty) for cell in token_cells(tokens_per_side, grid)]
    return torch.tensor(rows)


def token_cells(tokens_per_side: int, grid: int) -> list[tuple[int, int]]:
    """The grid cell (row, col) of each merged visual token, in the raster order Qwen2-VL emits them."""
    per_cell = tokens_per_side // grid
    return [(r // per_cell, c // per_cell) for r in range(tokens_per_side) for c in range(tokens_per_side)]
