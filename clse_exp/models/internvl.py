"""InternVL (transformers-native `-hf` checkpoints): pixel-shuffled tiles, each its own square grid.

The processor writes an image as `<img>` + tiles x image_seq_length `<IMG_CONTEXT>` + `</img>`: the tiles of
the any-aspect canvas in raster order, then a thumbnail of the whole image when there are several tiles
(GotOcr2ImageProcessor.crop_image_to_patches). A video is `FrameN: <img>...</img>` per frame, one tile each,
with the same placeholder id. Each tile's tokens are its (side/2)^2 pixel-shuffled patches in raster order.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from clse_exp.models.base import ModelAdapter, VisualSegment, runs_of


class InternVLAdapter(ModelAdapter):
    """One (1, side, side) segment per tile, thumbnail and video frame (side = 16 for 448-px tiles).

    A video's frames use the image placeholder and a one-tile image looks the same in `input_ids`, so
    frames are per-frame image segments: the forward call carries nothing that marks them as a video.
    """

    family = "internvl"

    def visual_token_ids(self, model: nn.Module) -> dict[str, int]:
        return {"image": model.config.image_token_id}

    def grid_side(self, model: nn.Module) -> int:
        vision = model.config.vision_config
        return int(vision.image_size[0] // vision.patch_size[0] * model.config.downsample_ratio)

    def visual_layout(self, model: nn.Module, input_ids: torch.Tensor, **_: Any) -> list[list[VisualSegment]]:
        side = self.grid_side(model)
        per_tile = side * side
        layout = []
        for ids in input_ids:
            segments = []
            for start, length in runs_of(ids, self.visual_token_ids(model)["image"]):
                tiles, rest = divmod(length, per_tile)
                if rest:
                    raise ValueError(f"image run of {length} tokens is not a whole number of {side}x{side} tiles")
                segments += [VisualSegment(start + i * per_tile, 1, side, side, "image") for i in range(tiles)]
            layout.append(segments)
        return layout
