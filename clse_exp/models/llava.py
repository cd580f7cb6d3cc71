"""LLaVA-1.5 and Video-LLaVA: Llama decoders fed a fixed square grid of CLIP patch tokens."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from clse_exp.models.base import ModelAdapter, VisualSegment, runs_of


class LlavaAdapter(ModelAdapter):
    """Each image is one (1, side, side) grid; side = image_size // patch_size (24 for LLaVA-1.5)."""

    family = "llava"
    token_pixels = 14  # one CLIP patch per visual token
    input_kinds = ("image",)  # LLaVA-1.5's processor has no video input: it would drop the frames

    def visual_token_ids(self, model: nn.Module) -> dict[str, int]:
        return {"image": model.config.image_token_id}

    def vision_encoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return self.vision_towers(model)[0].encoder.layers

    def vision_projector(self, model: nn.Module) -> nn.Module:
        return model.model.multi_modal_projector

    def grid_side(self, model: nn.Module) -> int:
        vision = model.config.vision_config
        return vision.image_size // vision.patch_size

    def visual_layout(self, model: nn.Module, input_ids: torch.Tensor, **_: Any) -> list[list[VisualSegment]]:
        side = self.grid_side(model)
        per_image = side * side
        layout = []
        for ids in input_ids:
            segments = []
            for kind, token_id in LlavaAdapter.visual_token_ids(self, model).items():
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
    """Video-LLaVA: an image is a 16 x 16 grid (its CLS token dropped); a video is 8 frames, each its CLS token
    then 16 x 16 patch tokens (transformers keeps the video CLS tokens). One segment per video covers the
    frames' patch tokens (T, 16, 16); the CLS tokens belong to no grid and are never pruned."""

    family = "video_llava"
    input_kinds = ("image", "video")

    def visual_token_ids(self, model: nn.Module) -> dict[str, int]:
        return {"image": model.config.image_token_id, "video": model.config.video_token_id}

    def vision_towers(self, model: nn.Module) -> list[nn.Module]:
        return [model.model.image_tower, model.model.video_tower]

    def visual_layout(self, model: nn.Module, input_ids: torch.Tensor, **_: Any) -> list[list[VisualSegment]]:
        side = self.grid_side(model)
        per_frame = side * side + 1
        images = super().visual_layout(model, input_ids)  # image runs (video runs are re-read below)
        layout = []
        for ids, segments in zip(input_ids, images, strict=True):
            segments = [s for s in segments if s.kind == "image"]
            for start, length in runs_of(ids, model.config.video_token_id):
                if length % per_frame:
                    raise ValueError(f"video run of {length} tokens is not a multiple of 1 + {side}x{side}")
                frames = length // per_frame
                index = tuple(start + f * per_frame + 1 + i for f in range(frames) for i in range(side * side))
                segments.append(VisualSegment(start, frames, side, side, "video", index))
            layout.append(sorted(segments, key=lambda s: s.start))
        return layout
