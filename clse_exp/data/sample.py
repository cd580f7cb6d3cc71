"""The one record every dataset yields and every prompt builder consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image


@dataclass
class Sample:
    """One question about zero or more images or one video.

    `images` are shown in order before the question; `video` is a list of frames (PIL images).
    `answer` is the gold answer string (may be empty when a benchmark scores from `meta`).
    `meta` carries the dataset's own columns a scorer needs (categories, options, ...).
    """

    id: str
    question: str
    answer: str
    images: list[Image.Image] = field(default_factory=list)
    video: list[Image.Image] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
