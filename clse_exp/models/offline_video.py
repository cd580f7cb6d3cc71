"""Numpy stand-ins for transformers' video processors, for machines without torchvision.

transformers' video processors need torchvision; the tiny offline models only need frames resized,
normalised and (for Qwen) cut into (temporal 2) x patch x patch patches in the order the vision tower expects.
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
                 temporal_patch_size: int = 2, fps: float = 2.0, mean: tuple[float, ...] = OPENAI_CLIP_MEAN,
                 std: tuple[float, ...] = OPENAI_CLIP_STD) -> None:
        self.fps = fps  # frames per second the frames were sampled at (Qwen2.5-VL's absolute time rope)
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.patch_size, self.merge_size, self.temporal_patch_size = patch_size, merge_size, temporal_patch_size
        self.mean, self.std = mean, std

    def _frames_array(self, frames: list[Image.Image]) -> np.ndarray:
        width, height = frames[0].size
        new_h, new_w = smart_resize(height, width, self.patch_size * self.merge_size, self.min_pixels, self.max_pixels)
        video = _normalised(frames, (new_w, new_h), self.mean, self.std)
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

    def metadata(self, frames: list[Image.Image]) -> SimpleNamespace:
        return SimpleNamespace(sampled_fps=self.fps)

    def __call__(self, videos: list[list[Image.Image]], return_tensors: str | None = "pt", **_: Any) -> BatchFeature:
        patches, grids = zip(*(self._patchify(self._frames_array(list(v))) for v in videos), strict=True)
        data = {"pixel_values_videos": np.concatenate(patches), "video_grid_thw": np.asarray(grids, dtype=np.int64)}
        features = BatchFeature(data=data, tensor_type=return_tensors)
        features["video_metadata"] = [self.metadata(list(v)) for v in videos]
        return features


class TimestampedFrameVideoProcessor(FrameVideoProcessor):
    """Qwen3-VL's processor writes each temporal patch's time as text (`<1.0 seconds>`): it needs the
    sampling fps and the sampled frame indices in the metadata."""

    def metadata(self, frames: list[Image.Image]) -> SimpleNamespace:
        return SimpleNamespace(sampled_fps=self.fps, fps=self.fps, frames_indices=list(range(len(frames))))


class SquareFrameVideoProcessor:
    """LLaVA-OneVision's and InternVL's video processors: every frame resized to one square tile,
    `pixel_values_videos` [videos, frames, C, size, size] (videos in a batch have the same frame count)."""

    def __init__(self, size: int, mean: tuple[float, ...] = OPENAI_CLIP_MEAN,
                 std: tuple[float, ...] = OPENAI_CLIP_STD) -> None:
        self.size, self.mean, self.std = size, mean, std

    def __call__(self, videos: list[list[Image.Image]], return_tensors: str | None = "pt", **_: Any) -> BatchFeature:
        data = {"pixel_values_videos": np.stack([_normalised(list(v), (self.size, self.size), self.mean, self.std)
                                                 for v in videos])}
        return BatchFeature(data=data, tensor_type=return_tensors)


def _normalised(frames: list[Image.Image], size: tuple[int, int], mean: tuple[float, ...],
                std: tuple[float, ...]) -> np.ndarray:
    """Frames resized (bicubic) to `size` = (width, height), scaled to [0, 1], normalised: [frames, C, H, W]."""
    mean_ = np.asarray(mean, dtype=np.float32)[:, None, None]
    std_ = np.asarray(std, dtype=np.float32)[:, None, None]
    arrays = []
    for frame in frames:
        pixels = np.asarray(frame.convert("RGB").resize(size, Image.BICUBIC), dtype=np.float32)
        arrays.append((pixels.transpose(2, 0, 1) / 255.0 - mean_) / std_)
    return np.stack(arrays)


class FrameClipVideoProcessor:
    """Video-LLaVA's video input without torchvision: every frame through the CLIP image processor, stacked
    to `pixel_values_videos` [videos, frames, C, H, W] (each frame resized and centre-cropped like an image)."""

    def __init__(self, image_processor: Any) -> None:
        self.image_processor = image_processor

    def __call__(self, videos: list[list[Image.Image]], return_tensors: str | None = "pt", **_: Any) -> BatchFeature:
        stacked = [np.stack(self.image_processor(list(frames), return_tensors="np")["pixel_values"])
                   for frames in videos]
        return BatchFeature(data={"pixel_values_videos": np.stack(stacked)}, tensor_type=return_tensors)
