"""A numpy stand-in for Qwen's video processor, for machines without torchvision.

transformers' Qwen2-VL video processor needs torchvision; the tiny offline models only need frames
resized, normalised and cut into (temporal 2) x 14 x 14 patches in the order the vision tower expects.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
from PIL import Image
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize


class FrameVideoProcessor:
    """Turns a list of PIL frames into `pixel_values_videos` [patches, C*tp*ps*ps] and `video_grid_thw`."""

    def __init__(self, min_pixels: int, max_pixels: int, patch_size: int = 14, merge_size: int = 2,
                 temporal_patch_size: int = 2, fps: float = 2.0) -> None:
        self.fps = fps  # frames per second the frames were sampled at (Qwen2.5-VL's absolute time rope)
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.patch_size, self.merge_size, self.temporal_patch_size = patch_size, merge_size, temporal_patch_size

    def _frames_array(self, frames: list[Image.Image]) -> np.ndarray:
        width, height = frames[0].size
        new_h, new_w = smart_resize(height, width, self.patch_size * self.merge_size, self.min_pixels, self.max_pixels)
        mean = np.asarray(OPENAI_CLIP_MEAN, dtype=np.float32)[:, None, None]
        std = np.asarray(OPENAI_CLIP_STD, dtype=np.float32)[:, None, None]
        arrays = []
        for frame in frames:
            pixels = np.asarray(frame.convert("RGB").resize((new_w, new_h), Image.BICUBIC), dtype=np.float32)
            arrays.append((pixels.transpose(2, 0, 1) / 255.0 - mean) / std)
        video = np.stack(arrays)
        remainder = len(video) % self.temporal_patch_size
        if remainder:  # repeat the last frame so time splits into whole temporal patches
            video = np.concatenate([video, np.repeat(video[-1:], self.temporal_patch_size - remainder, 0)])
        return video

    def _patchify(self, video: np.ndarray) -> tuple[np.ndarray, list[int]]:
        frames, channels, height, width = video.shape
        tp, ps, m = self.temporal_patch_size, self.patch_size, self.merge_size
        grid_t, grid_h, grid_w = frames // tp, height // ps, width // ps
        patches = video.reshape(grid_t, tp, channels, grid_h // m, m, ps, grid_w // m, m, ps)
        patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return patches.reshape(grid_t * grid_h * grid_w, channels * tp * ps * ps), [grid_t, grid_h, grid_w]

    def __call__(self, videos: list[list[Image.Image]], return_tensors: str | None = "pt", **_: Any) -> BatchFeature:
        patches, grids = zip(*(self._patchify(self._frames_array(list(v))) for v in videos), strict=True)
        data = {"pixel_values_videos": np.concatenate(patches), "video_grid_thw": np.asarray(grids, dtype=np.int64)}
        features = BatchFeature(data=data, tensor_type=return_tensors)
        features["video_metadata"] = [SimpleNamespace(sampled_fps=self.fps) for _ in videos]
        return features
