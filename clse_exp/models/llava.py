"""LLaVA-1.5 and Video-LLaVA: Llama decoders fed a fixed square grid of CLIP patch tokens."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from clse_exp.models.base import ModelAdapter, VisualSegment, runs_of


class LlavaAdapter(ModelAdapter):
    """Each image is one (1, side, side) grid; side = image_size // patch_size (24 for LLaVA-1.5)."""

    family = "llava"

    def visual_token_ids(self, model: nn.Module) -> dict[str, int]:
        return {"image": model.config.image_token_id}

    def grid_side(self, model: nn.Module) -> int:
        vision = model.config.vision_config
        return vision.image_size // vision.patch_size

    def visual_layout(self, model: nn.Module, input_ids: torch.Tensor, **_: Any) -> list[list[VisualSegment]]:
        side = self.grid_side(model)
        per_image = side * side
        layout = []
        for ids in input_ids:
            segments = []
            for kind, token_id in self.visual_token_ids(model).items():
                for start, length in runs_of(ids, token_id):
                    if length % per_image:
                        raise ValueError(f"{kind} run of {length} tokens is not a multiple of {side}x{side}")
                    frames = length // per_image
                    if kind == "video":
                        segments.append(VisualSegment(start, frames, side, side, kind))
                    else:
                        # Adjacent images without separators form one run: split it per image.
                        segments += [
                            VisualSegment(start + i * per_image, 1, side, side, kind) for i in range(frames)
                        ]
            layout.append(sorted(segments, key=lambda s: s.start))
        return layout


class VideoLlavaAdapter(LlavaAdapter):
    """Video-LLaVA: images are 16x16 grids after the CLS token is dropped; a video is 8 such frames."""

    family = "video_llava"

    def visual_token_ids(self, model: nn.Module) -> dict[str, int]:
        return {"image": model.config.image_token_id, "video": model.config.video_token_id}
