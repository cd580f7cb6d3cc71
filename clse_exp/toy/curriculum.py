"""The toy's training stream: synthetic scenes and questions, disjoint from the dataset's splits.

Each sample also carries what the training-only losses need: the scene (per-cell colour and shape for the
probe) and the evidence cells a positional question names (for the grounding loss).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

from clse_exp.data.sample import Sample
from clse_exp.data.synthetic import INSTRUCTION, ask, draw_scene, random_scene


def training_sample(index: int, seed: int, qtypes: Sequence[str], image_size: int, grid: int) -> Sample:
    """Training sample `index`: a pure function of its arguments, disjoint from the dataset's splits."""
    digest = hashlib.sha256(f"toy-train|{seed}|{index}".encode()).hexdigest()
    rng = random.Random(int(digest[:16], 16))
    qtype = qtypes[index % len(qtypes)]
    scene = random_scene(rng, grid)
    question, answer, extra = ask(qtype, scene, grid, rng)
    return Sample(f"toy-train-{index:07d}", question + INSTRUCTION, answer, [draw_scene(scene, image_size, grid)],
                  meta={"qtype": qtype, "evidence": evidence_cells(extra), "scene": scene})


def evidence_cells(extra: dict) -> list[tuple[int, int]]:
    """The cell a positional question names (colour / shape at a cell); other questions are left unsupervised:
    their evidence is found by content, and a uniform target over several objects would hide their number."""
    if "cell" in extra:
        return [tuple(extra["cell"])]
    return []
