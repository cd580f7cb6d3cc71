"""Qwen3-VL (dense): Qwen2-VL's merged patch grids, but a video is one run of tokens per frame group.

The processor writes a video as `<t seconds><|vision_start|>` + h*w video tokens + `<|vision_end|>` per
temporal patch (processing_qwen3_vl.py, `replace_video_token`), and M-RoPE places every frame group like
an image of its own, time carried only by the timestamp text (modeling_qwen3_vl.py, `get_rope_index`).
So each frame group is its own (1, h, w) segment and the timestamps belong to no segment.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from clse_exp.models.base import EncoderRows, VisualSegment
from clse_exp.models.qwen2_vl import Qwen2VLAdapter


class Qwen3VLAdapter(Qwen2VLAdapter):
    family = "qwen3_vl"
    token_pixels = 32  # 16-pixel patches merged 2 x 2

    def vision_layer_inputs(self, model: nn.Module, hidden: torch.Tensor, layer_kwargs: dict, tower_kwargs: dict
                            ) -> list[EncoderRows]:
        """One item per segment: the tower encodes a (T, H, W) video in one piece (its blocks attend within each
        temporal patch, no windows), while the layout makes each temporal patch a (1, H, W) segment of its own."""
        items = []
        for (t, _, _), item in zip(tower_kwargs["grid_thw"].tolist(),
                                   super().vision_layer_inputs(model, hidden, layer_kwargs, tower_kwargs), strict=True):
            rows = len(item.hidden) // t
            tokens = rows // model.model.visual.spatial_merge_size**2
            for i in range(t):
                part = slice(i * rows, (i + 1) * rows)
                items.append(EncoderRows(item.hidden[part], item.cos[part], item.sin[part], [rows],
                                         item.token[part] - i * tokens))
        return items

    def vision_flops(self, model: nn.Module, segments: list[VisualSegment]) -> int | None:
        return None  # 16-px patches, learned position embeddings and DeepStack mergers: no formula here yet

    def visual_layout(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        image_grid_thw: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> list[list[VisualSegment]]:
        """Per sample, one segment per image and one per video frame group, in prompt order.

        A (T, H, W) video grid is split into T (1, H, W) frame groups, as get_rope_index splits it; without
        grids (generate() consumes them before the forward call) each run's grid is read from its M-RoPE ids,
        which gives the same segments."""
        if video_grid_thw is not None:
            video_grid_thw = video_grid_thw.repeat_interleave(video_grid_thw[:, 0], dim=0)
            video_grid_thw[:, 0] = 1
        return super().visual_layout(model, input_ids, image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw,
                                     position_ids=position_ids, **kwargs)
