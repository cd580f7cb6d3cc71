"""Shared test material: seeded random images and prompts of different lengths (so batches pad)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from clse_exp.data.sample import Sample

QUESTIONS = (
    "Is there a red circle?",
    "What colour is the shape in the top left cell? Answer with one word.",
    "How many blue shapes are there in the image? Answer with one word.",
)


def noise_image(seed: int, size: int = 224) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def samples(
    n: int = 3, images_per_sample: tuple[int, ...] = (1, 2, 1), sizes: tuple[int, ...] = (224,)
) -> list[Sample]:
    """n samples with different prompt lengths, image counts and (optionally) image sizes."""
    out = []
    for i in range(n):
        count = images_per_sample[i % len(images_per_sample)]
        size = sizes[i % len(sizes)]
        images = [noise_image(100 * i + j, size) for j in range(count)]
        out.append(Sample(f"s{i}", QUESTIONS[i % len(QUESTIONS)], "yes", images))
    return out
