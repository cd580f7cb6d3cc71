"""Uniform frame sampling from video files with PyAV (pip wheels, CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def sample_frames(path: str | Path, num_frames: int) -> list[Image.Image]:
    """`num_frames` RGB frames at uniformly spaced positions over the whole video (lmms-eval style linspace)."""
    import av

    with av.open(str(path)) as container:
        frames = [frame.to_image() for frame in container.decode(video=0)]
    if not frames:
        raise ValueError(f"no decodable frames in {path}")
    picks = np.linspace(0, len(frames) - 1, num_frames).round().astype(int)
    return [frames[i].convert("RGB") for i in picks]
