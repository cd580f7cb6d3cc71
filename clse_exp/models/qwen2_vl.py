"""Qwen2-VL and Qwen2.5-VL: M-RoPE decoders whose visual tokens follow a 2x2-merged patch grid."""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn
from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

from clse_exp.compat import vision_window_index
from clse_exp.efficiency.counts import host_side, upload
from clse_exp.efficiency.flops import qwen2vl_vision_flops
from clse_exp.models.base import EncoderRows, ModelAdapter, VisualSegment, runs_of


class Qwen2VLAdapter(ModelAdapter):
    family = "qwen2_vl"
    mrope = True
    encoder_kinds = ("image", "video")  # one tower: the images of a batch, then its videos
    layout_keys = ("image_grid_thw", "video_grid_thw")

    def visual_token_ids(self, model: nn.Module) -> dict[str, int]:
        return {"image": model.config.image_token_id, "video": model.config.video_token_id}

    def vision_towers(self, model: nn.Module) -> list[nn.Module]:
        return [model.model.visual]

    def vision_encoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.visual.blocks

    def vision_projector(self, model: nn.Module) -> nn.Module:
        """The patch merger: groups of merge_size^2 rows (in the tower's order) -> one LLM embedding."""
        return model.model.visual.merger

    def vision_layer_inputs(self, model: nn.Module, hidden: torch.Tensor, layer_kwargs: dict, tower_kwargs: dict
                            ) -> list[EncoderRows]:
        """The tower packs every image of the call into one sequence [rows, C]: split it per image, with the
        rotary and attention blocks the layer got and the visual token each row merges into. Qwen2.5-VL
        permutes merge units into windows before its blocks; the tower's window index undoes that."""
        visual = model.model.visual
        unit = visual.spatial_merge_size**2
        cos, sin = layer_kwargs["position_embeddings"]
        bounds = layer_kwargs["cu_seqlens"].tolist()
        grids = tower_kwargs["grid_thw"].tolist()
        with host_side():  # the row -> token maps are host arithmetic on the grids: built here, uploaded once
            host_grids = torch.tensor(grids)
            order = vision_window_index(visual, host_grids) if hasattr(visual, "window_size") else None
            maps, token = [], 0
            for t, h, w in grids:
                tokens = t * h * w // unit
                unit_token = torch.arange(tokens) if order is None else order[token : token + tokens] - token
                maps.append(unit_token.repeat_interleave(unit))
                token += tokens
            joined = torch.cat(maps) if maps else torch.zeros(0, dtype=torch.long)
        row_tokens = upload(joined, hidden.device).split([len(m) for m in maps])
        items, row = [], 0
        for (t, h, w), row_token in zip(grids, row_tokens, strict=True):
            rows = t * h * w
            inside = [b for b in bounds if row <= b <= row + rows]
            blocks = [end - begin for begin, end in itertools.pairwise(inside)]
            items.append(EncoderRows(hidden[row : row + rows].detach(), cos[row : row + rows], sin[row : row + rows],
                                     blocks, row_token))
            row += rows
        return items

    @staticmethod
    def vision_queries_keys(layer: nn.Module, rows: EncoderRows) -> tuple[torch.Tensor, torch.Tensor]:
        """A vision block's post-RoPE queries and keys [heads, rows, head_dim], as its attention computes them."""
        attention = layer.attn
        q, k, _ = attention.qkv(layer.norm1(rows.hidden)).view(len(rows.hidden), 3, attention.num_heads, -1).unbind(1)
        q, k = apply_rotary_pos_emb_vision(q, k, rows.cos, rows.sin)
        return q.transpose(0, 1), k.transpose(0, 1)

    def vision_flops(self, model: nn.Module, segments: list[VisualSegment]) -> int | None:
        if model.config.model_type != "qwen2_vl":  # Qwen2.5-VL's windowed attention has no formula here yet
            return None
        merge = model.config.vision_config.spatial_merge_size
        grids = [(s.t, s.h * merge, s.w * merge) for s in segments]
        return qwen2vl_vision_flops(model.config.vision_config, grids)

    def visual_layout(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        image_grid_thw: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **_: Any,
    ) -> list[list[VisualSegment]]:
        """Grids come from `*_grid_thw` when given; generate() passes only the M-RoPE position ids
        (the grids were consumed by the vision encoder), from which each run's (T, H, W) is read."""
        merge = model.config.vision_config.spatial_merge_size
        grids = {
            "image": iter(image_grid_thw.tolist() if image_grid_thw is not None else []),
            "video": iter(video_grid_thw.tolist() if video_grid_thw is not None else []),
        }
        layout = []
        for b, ids in enumerate(input_ids):
            segments = []
            for kind, token_id in self.visual_token_ids(model).items():
                for start, length in runs_of(ids, token_id):
                    grid = next(grids[kind], None)
                    if grid is not None:
                        segment = VisualSegment(start, grid[0], grid[1] // merge, grid[2] // merge, kind)
                    elif position_ids is not None:
                        segment = _segment_from_positions(position_ids[-3:, b, start : start + length], start, kind)
                    else:
                        raise ValueError(f"{kind} tokens at {start} have no grid: pass {kind}_grid_thw")
                    if segment.length != length:
                        raise ValueError(
                            f"{kind} grid {segment.grid} implies {segment.length} tokens but the prompt has {length}"
                        )
                    segments.append(segment)
            layout.append(sorted(segments, key=lambda s: s.start))
        return layout


class Qwen2_5_VLAdapter(Qwen2VLAdapter):  # noqa: N801 - the family's own spelling
    family = "qwen2_5_vl"


def _segment_from_positions(positions: torch.Tensor, start: int, kind: str) -> VisualSegment:
    """A run's grid from its M-RoPE ids [3, n]: rows and columns count the distinct h and w positions."""
    height = int(positions[1].max() - positions[1].min()) + 1
    width = int(positions[2].max() - positions[2].min()) + 1
    return VisualSegment(start, positions.shape[1] // (height * width), height, width, kind)
